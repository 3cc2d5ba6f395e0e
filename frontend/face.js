// The local avatar's face: an SVG whose mouth follows the speech being played and whose eyes
// blink now and then. Pure presentation; the caller feeds it mouth openness every frame.
// The drawing (FACE_SVG) and its colours (face.css) are shared by the page and the widget.

/** The inside of the face's <svg viewBox="0 0 200 200">; styled by face.css. */
export const FACE_SVG = `
  <defs>
  <radialGradient id="face-bg" cx="50%" cy="38%" r="70%">
  <stop offset="0%" class="bg-stop-a" />
  <stop offset="100%" class="bg-stop-b" />
  </radialGradient>
  <linearGradient id="face-skin" x1="0" y1="0" x2="0" y2="1">
  <stop offset="0%" class="skin-stop-a" />
  <stop offset="100%" class="skin-stop-b" />
  </linearGradient>
  </defs>
  <rect width="200" height="200" fill="url(#face-bg)" />
  <path class="hair-back" d="M38 104c0-46 28-72 62-72s62 26 62 72v34c-8-6-12-20-12-30H50c0 10-4 24-12 30z" />
  <rect class="neck" x="84" y="160" width="32" height="30" rx="12" />
  <path class="shoulders" d="M40 200c4-24 28-34 60-34s56 10 60 34z" />
  <ellipse class="ear" cx="41" cy="110" rx="8" ry="13" />
  <ellipse class="ear" cx="159" cy="110" rx="8" ry="13" />
  <ellipse class="head" cx="100" cy="108" rx="59" ry="66" fill="url(#face-skin)" />
  <path class="hair" d="M41 90c2-34 26-54 59-54 34 0 57 20 59 54-12-4-24-14-32-28-18 14-48 24-86 28z" />
  <path class="brow" d="M68 87q11-6 22 0" />
  <path class="brow" d="M110 87q11-6 22 0" />
  <g class="eye" data-part="eye"><ellipse cx="79" cy="103" rx="6.5" ry="8" /><circle class="glint" cx="81" cy="100" r="1.8" /></g>
  <g class="eye" data-part="eye"><ellipse cx="121" cy="103" rx="6.5" ry="8" /><circle class="glint" cx="123" cy="100" r="1.8" /></g>
  <path class="nose" d="M100 110q-5 14 0 16" />
  <ellipse class="cheek" cx="68" cy="127" rx="10" ry="6" />
  <ellipse class="cheek" cx="132" cy="127" rx="10" ry="6" />
  <path class="mouth" data-part="mouth" d="M83 141 Q 100 142 117 141 Q 100 145 83 141 Z" />
`;

const MOUTH_X = 100;
const MOUTH_Y = 141;
const MOUTH_HALF_W = 17;

export class Face {
  /** @param {SVGSVGElement} svg */
  constructor(svg) {
    this.svg = svg;
    if (!svg.querySelector("[data-part=mouth]")) svg.innerHTML = FACE_SVG;
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
