// The local avatar's face: an SVG whose mouth follows the speech being played and whose eyes
// blink now and then. Pure presentation; the caller feeds it mouth openness every frame.

const MOUTH_X = 100;
const MOUTH_Y = 141;
const MOUTH_HALF_W = 17;

export class Face {
  /** @param {SVGSVGElement} svg */
  constructor(svg) {
    this.svg = svg;
    this.mouth = svg.querySelector("[data-part=mouth]");
    this.eyes = [...svg.querySelectorAll("[data-part=eye]")];
    this.open = 0;
    this.nextBlink = performance.now() + 1500 + Math.random() * 2500;
    this.blinkUntil = 0;
    this.reducedMotion = window.matchMedia?.("(prefers-reduced-motion: reduce)").matches ?? false;
    this.draw(0);
  }

  /** Advance one animation frame. `target` is mouth openness 0..1 for what is heard now. */
  tick(now, target) {
    // Open quickly, close a little slower: reads as speech rather than flicker.
    const k = target > this.open ? 0.55 : 0.3;
    this.open += (target - this.open) * k;
    if (this.open < 0.002) this.open = 0;
    this.draw(this.open);
    this.blink(now);
  }

  draw(open) {
    const w = MOUTH_HALF_W + open * 3;
    const drop = 4 + open * 20; // lower lip
    const lift = 1 - open * 4; // upper lip
    const l = MOUTH_X - w;
    const r = MOUTH_X + w;
    this.mouth.setAttribute(
      "d",
      `M ${l} ${MOUTH_Y} Q ${MOUTH_X} ${MOUTH_Y + lift} ${r} ${MOUTH_Y} Q ${MOUTH_X} ${MOUTH_Y + drop} ${l} ${MOUTH_Y} Z`,
    );
  }

  blink(now) {
    if (this.reducedMotion) return;
    if (now >= this.nextBlink) {
      this.blinkUntil = now + 140;
      // Now and then a double blink, like people do.
      this.nextBlink = now + (Math.random() < 0.15 ? 320 : 2500 + Math.random() * 4000);
    }
    const closed = now < this.blinkUntil;
    for (const eye of this.eyes) eye.classList.toggle("closed", closed);
    this.svg.dataset.blinking = String(closed);
  }
}
