// Response latency breakdown for the debug panel (the footer's "Latency" disclosure; `?debug=1`
// opens it on load). Per reply: where the time between the end of the user's speech and the
// avatar's first audio went, for the last reply and as the median of the last 20.
//
// Two clocks, never mixed:
// - page hops are differences of performance.now() readings taken in this page (end of speech =
//   where the server's VAD ended the utterance, `transcript.final.end_s` in seconds of the audio
//   this page sent, mapped to the capture time of that frame (SessionSocket.captureTimeOf); the
//   last microphone frame with voice in it only when that audio is unknown; the rest = when each
//   event reached the page);
// - server hops are differences of the events' `ts` (unix ms stamped by the STT and avatar
//   workers when they built the event).
// A page time minus a server `ts` would mix the browser's clock with the server's (unknown skew,
// plus the network delay) and mean nothing, so it is never computed. The server hops compare
// stamps of two worker processes: exact on one machine, as good as their NTP sync across machines.

export const HISTORY = 20;

/** [key, clock, label]: the rows of the panel, in order. */
export const METRICS = [
  ["speech_to_final", "page", "End of speech → final transcript"],
  ["final_to_reply", "page", "Final transcript → reply text"],
  ["reply_to_audio", "page", "Reply text → first audio"],
  ["speech_to_heard", "page", "End of speech → first audio heard"],
  ["server_final_to_reply", "server", "Final → reply (avatar worker)"],
  ["server_reply_to_audio", "server", "Reply → first audio event"],
];

const CLOCKS = {
  page: "Page clock (this browser)",
  server: "Server clock (event ts)",
};

const PENDING_MAX = 16;

export class LatencyTracker {
  constructor({ historySize = HISTORY, onChange = null } = {}) {
    this.historySize = historySize;
    this.onChange = onChange;
    this.clear();
  }

  /** Forget everything (a new conversation). */
  reset() {
    this.clear();
    this.changed();
  }

  clear() {
    this.finals = new Map(); // utterance_id → {at, ts, speechEnd, claimed}
    this.lastFinal = null;
    this.typedAt = 0; // page time of the last typed message no reply has claimed yet
    this.records = new Map(); // reply_id → record, newest last
    this.history = []; // records whose first audio arrived, oldest first
  }

  /**
   * A voice `transcript.final` reached the page at `at`; `speechEnd`: the end of speech on the page
   * clock, `endFrom`: "vad" (the server's VAD end, mapped through the frames sent) or "level".
   */
  final(event, at, speechEnd, endFrom = "level") {
    if (!event.utterance_id || !(event.text || "").trim() || this.finals.has(event.utterance_id)) return;
    // Voice heard before the previous final belongs to that utterance, not to this one.
    const prev = this.lastFinal?.at ?? 0;
    const entry = { at, ts: num(event.ts), speechEnd: speechEnd > prev ? speechEnd : null, endFrom, claimed: false };
    this.finals.set(event.utterance_id, entry);
    this.lastFinal = entry;
    trim(this.finals);
  }

  /** The user sent a typed message at `at`: its reply is timed from here. */
  typed(at) {
    this.typedAt = at;
  }

  /** An `avatar.reply` reached the page at `at` (only the first one of a reply counts). */
  reply(event, at) {
    const r = this.record(event.reply_id, event.turn_id);
    if (r && r.page.reply == null) {
      r.page.reply = at;
      r.server.reply = num(event.ts);
      this.changed();
    }
  }

  /**
   * The first audio of a reply reached the page at `at`: the local avatar's first `avatar.audio`
   * chunk, or a cloud avatar's `avatar.started_talking` (its audio comes over LiveKit).
   */
  audio(replyId, ts, at, avatar) {
    const r = this.record(replyId);
    if (!r || r.page.audio != null) return;
    r.page.audio = at;
    r.server.audio = num(ts);
    r.avatar = avatar;
    // A cloud avatar's playout is not observable here: its start of talking counts as heard.
    if (avatar === "cloud") r.page.heard = at;
    this.history.push(r);
    if (this.history.length > this.historySize) this.history.shift();
    this.changed();
  }

  /** The local player scheduled the reply's first chunk to reach the speakers at `heardAt`. */
  heard(replyId, heardAt) {
    const r = this.records.get(replyId);
    if (r && r.page.heard == null) {
      r.page.heard = heardAt;
      this.changed();
    }
  }

  /** Numbers for the panel and the test hook: {last, median, count, replies}. */
  snapshot() {
    const replies = this.history.map(hops);
    const median = {};
    for (const [key] of METRICS) median[key] = medianOf(replies.map((h) => h[key]));
    return { last: replies.at(-1) ?? null, median, count: replies.length, replies };
  }

  // ---- internals

  /** The record of a reply, made on first sight and tied to the turn it answers. */
  record(replyId, turnId = null) {
    if (!replyId) return null;
    let r = this.records.get(replyId);
    if (r) return r;
    r = {
      reply_id: replyId,
      source: null,
      avatar: null,
      speechEnd: null,
      page: { start: null, final: null, reply: null, audio: null, heard: null },
      server: { final: null, reply: null, audio: null },
    };
    // The avatar worker names a reply "r-<turn id>"; a voice turn's id is its utterance id.
    turnId = turnId || (replyId.startsWith("r-") ? replyId.slice(2) : null);
    const final = turnId ? this.finals.get(turnId) : null;
    if (final && !final.claimed) {
      final.claimed = true;
      r.source = "voice";
      r.speechEnd = final.speechEnd != null ? final.endFrom : null;
      r.page.start = final.speechEnd;
      r.page.final = final.at;
      r.server.final = final.ts;
    } else if (this.typedAt) {
      r.source = "text";
      r.page.start = this.typedAt;
      this.typedAt = 0;
    }
    this.records.set(replyId, r);
    trim(this.records);
    return r;
  }

  changed() {
    if (this.onChange) this.onChange();
  }
}

/** The hops of one reply in whole ms; null where a moment is unknown. */
function hops(r) {
  const p = r.page;
  const s = r.server;
  const from = p.final ?? p.start; // a typed message has no final: its reply counts from the send
  return {
    reply_id: r.reply_id,
    source: r.source,
    avatar: r.avatar,
    speech_end: r.speechEnd, // "vad" | "level" | null: where the end of speech came from
    speech_to_final: r.source === "voice" ? diff(p.start, p.final) : null,
    final_to_reply: diff(from, p.reply),
    reply_to_audio: diff(p.reply, p.audio),
    speech_to_heard: diff(p.start, p.heard),
    server_final_to_reply: diff(s.final, s.reply),
    server_reply_to_audio: diff(s.reply, s.audio),
  };
}

function diff(a, b) {
  return a == null || b == null ? null : Math.round(b - a);
}

function num(v) {
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

function medianOf(values) {
  const v = values.filter((x) => x != null).sort((a, b) => a - b);
  if (!v.length) return null;
  const mid = v.length >> 1;
  return v.length % 2 ? v[mid] : Math.round((v[mid - 1] + v[mid]) / 2);
}

function trim(map) {
  while (map.size > PENDING_MAX) map.delete(map.keys().next().value);
}

/** The table inside `root` (a <details>): one row per metric, last reply and median columns. */
export class LatencyPanel {
  constructor(root, tracker) {
    this.root = root;
    this.tracker = tracker;
    this.summary = root.querySelector(".latency-summary");
    this.countEl = root.querySelector(".latency-count");
    this.cells = new Map(); // "key/col" → <td>
    const table = root.querySelector("table");
    for (const clock of Object.keys(CLOCKS)) {
      const body = document.createElement("tbody");
      const head = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "rowgroup";
      th.colSpan = 3;
      th.className = "latency-clock";
      th.textContent = CLOCKS[clock];
      head.append(th);
      body.append(head);
      for (const [key, c, label] of METRICS) {
        if (c !== clock) continue;
        const tr = document.createElement("tr");
        tr.dataset.metric = key;
        const name = document.createElement("th");
        name.scope = "row";
        name.textContent = label;
        tr.append(name);
        for (const col of ["last", "median"]) {
          const td = document.createElement("td");
          td.dataset.metric = key;
          td.dataset.col = col;
          tr.append(td);
          this.cells.set(`${key}/${col}`, td);
        }
        body.append(tr);
      }
      table.append(body);
    }
    root.addEventListener("toggle", () => this.render());
    this.render();
  }

  render() {
    if (!this.root.open) return; // filled in when opened
    const snap = this.tracker.snapshot();
    const last = snap.last;
    for (const [key] of METRICS) {
      this.fill(this.cells.get(`${key}/last`), last?.[key] ?? null);
      this.fill(this.cells.get(`${key}/median`), snap.median[key]);
    }
    this.countEl.textContent = String(snap.count);
    this.summary.textContent = last
      ? `Last reply ${last.reply_id}: ${last.source === "text" ? "typed message" : last.source === "voice" ? "spoken question" : "unknown turn"}, ${last.avatar} avatar.`
      : "No reply yet. Ask something: the numbers appear with the avatar's first audio.";
  }

  fill(td, value) {
    td.textContent = value == null ? "–" : `${value} ms`;
    if (value == null) delete td.dataset.value;
    else td.dataset.value = String(value);
  }
}
