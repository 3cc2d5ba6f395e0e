// Cloud avatars (HeyGen, LiveAvatar): the vendor streams video and audio over LiveKit. The page
// joins the room with the url and client token the server handed out, shows the remote tracks,
// and relays the vendor's data-channel events (e.g. avatar_start_talking) up to the server.
//
// livekit-client is loaded on demand from its pinned npm build (see setup.sh): the local avatar never needs it.

const VENDOR_SCRIPT = new URL("./node_modules/livekit-client/dist/livekit-client.umd.js", import.meta.url);
const MAX_RELAY_BYTES = 3500; // the server accepts avatar.event payloads up to 4 KiB
// The vendors' avatar participants (HeyGen / LiveAvatar rooms: `heygen`; LiveAvatar in your own
// room: `liveavatar-avatar-agent`): anyone else's tracks and data are not the avatar.
const AVATAR_IDENTITIES = new Set(["heygen", "liveavatar-avatar-agent"]);
const isAvatar = (participant) => !participant || AVATAR_IDENTITIES.has(participant.identity);

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
  }

  async connect(url, token) {
    // session.ready replayed after a reconnect: same room. A new token means a new vendor session.
    if (this.room && this.url === url && this.token === token) return;
    await this.disconnect();
    this.url = url;
    this.token = token;
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
      .on(RoomEvent.TrackSubscribed, (track, _pub, participant) => {
        if (!participant || !isAvatar(participant)) return;
        if (track.kind === Track.Kind.Video) track.attach(this.video);
        else if (track.kind === Track.Kind.Audio) track.attach(this.audio);
      })
      .on(RoomEvent.TrackUnsubscribed, (track) => track.detach())
      .on(RoomEvent.DataReceived, (payload, participant, _kind, topic) => {
        if (isAvatar(participant)) this.relay(payload, topic); // no participant: sent by the server
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
