// Cloud avatars (HeyGen, LiveAvatar): the vendor streams video and audio over LiveKit. The page
// joins the room with the url and client token the server handed out, shows the tracks of the
// avatar's participant only (its identity comes in session.ready; LiveAvatar's is "heygen"), and
// relays up to the server only the vendor events it needs (talking state), not every per-chunk
// data message.
//
// livekit-client is loaded on demand from its pinned npm build (see setup.sh): the local avatar never needs it.

const VENDOR_SCRIPT = new URL("./node_modules/livekit-client/dist/livekit-client.umd.js", import.meta.url);
const MAX_RELAY_BYTES = 3500; // the server accepts avatar.event payloads up to 4 KiB
// Without an identity from session.ready, the vendors' known avatar participants (HeyGen /
// LiveAvatar rooms: `heygen`; LiveAvatar in your own room: `liveavatar-avatar-agent`).
const AVATAR_IDENTITIES = new Set(["heygen", "liveavatar-avatar-agent"]);
// What the server acts on: HeyGen's talking events (matched by task_id). LiveAvatar's events reach the
// avatar worker itself (its LITE socket, or the room it joins as the agent in FULL mode).
const RELAYED = new Set(["avatar_start_talking", "avatar_stop_talking"]);

let loading = null;

export function loadLivekit() {
  if (window.LivekitClient) return Promise.resolve(window.LivekitClient);
  if (!loading) {
    loading = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = VENDOR_SCRIPT.href;
      s.async = true;
      s.onload = () =>
        window.LivekitClient ? resolve(window.LivekitClient) : reject(new Error("livekit-client did not load"));
      s.onerror = () => {
        loading = null;
        reject(new Error("livekit-client is missing: run frontend/setup.sh"));
      };
      document.head.append(s);
    });
  }
  return loading;
}

export class CloudAvatar {
  /**
   * @param {{video: HTMLVideoElement, audio: HTMLAudioElement,
   *   onVendorEvent: (type: string, data: object) => void,
   *   onState: (state: "connecting"|"connected"|"reconnecting"|"disconnected"|"failed", err?: Error) => void}} opts
   */
  constructor({ video, audio, onVendorEvent, onState }) {
    this.video = video;
    this.audio = audio;
    this.onVendorEvent = onVendorEvent;
    this.onState = onState;
    this.room = null;
    this.url = "";
    this.connectAttempts = 0;
    this.eventsRelayed = 0;
    this.eventsReceived = 0; // the avatar's data-channel events the page saw (relayed or not)
  }

  async connect(url, token, avatarIdentity = null) {
    // session.ready replayed after a reconnect: same room. A new token means a new vendor session.
    if (this.room && this.url === url && this.token === token) return;
    await this.disconnect();
    this.url = url;
    this.token = token;
    this.avatarIdentity = avatarIdentity || null;
    this.onState("connecting");
    let lk;
    try {
      lk = await loadLivekit();
    } catch (err) {
      this.onState("failed", err);
      return;
    }
    const { Room, RoomEvent, Track } = lk;
    const room = new Room({ adaptiveStream: true, dynacast: true });
    this.room = room;
    room
      .on(RoomEvent.TrackSubscribed, (track, _publication, participant) => {
        if (!this.isAvatar(participant)) return; // another participant (an agent, a viewer): not the face
        if (track.kind === Track.Kind.Video) track.attach(this.video);
        else if (track.kind === Track.Kind.Audio) track.attach(this.audio);
      })
      .on(RoomEvent.TrackUnsubscribed, (track) => track.detach())
      .on(RoomEvent.DataReceived, (payload, participant, _kind, topic) => {
        if (!participant || this.isAvatar(participant)) this.relay(payload, topic); // none: sent by the server
      })
      .on(RoomEvent.Reconnecting, () => this.onState("reconnecting"))
      .on(RoomEvent.Reconnected, () => this.onState("connected"))
      .on(RoomEvent.Disconnected, () => {
        if (this.room === room) this.onState("disconnected");
      });
    this.connectAttempts++;
    try {
      await room.connect(url, token);
      if (this.room !== room) return;
      await room.startAudio().catch(() => {});
      this.onState("connected");
    } catch (err) {
      if (this.room !== room) return;
      this.room = null; // a later session.ready may try again
      this.url = "";
      this.onState("failed", err);
    }
  }

  isAvatar(participant) {
    if (!participant) return false;
    return this.avatarIdentity ? participant.identity === this.avatarIdentity : AVATAR_IDENTITIES.has(participant.identity);
  }

  relay(payload, topic) {
    let msg;
    try {
      msg = JSON.parse(new TextDecoder().decode(payload));
    } catch {
      return; // not JSON: not an event we understand
    }
    if (!msg || typeof msg !== "object") return;
    const type = typeof msg.type === "string" ? msg.type : typeof msg.event_type === "string" ? msg.event_type : "";
    if (!type) return;
    this.eventsReceived++;
    if (!RELAYED.has(type)) return; // per-chunk acks and the like: the server has no use for them
    const { type: _t, event: _e, ...rest } = msg;
    if (topic) rest.topic = topic;
    const data = JSON.stringify(rest).length <= MAX_RELAY_BYTES ? rest : {};
    this.eventsRelayed++;
    this.onVendorEvent(type.slice(0, 64), data);
  }

  async disconnect() {
    const room = this.room;
    this.room = null;
    this.url = "";
    if (room) await room.disconnect().catch(() => {});
    this.video.srcObject = null;
    this.audio.srcObject = null;
  }
}
