// Getting a session ({session_id, token, ws_url}) for the page or the <avatar-stack-avatar> widget.
//
// Three ways, first match wins:
//  - `endpoint`: the customer's own backend, which created the session with GATEWAY_API_KEY and
//    returns only the session's id, token and ws_url (examples/backend). The page never sees a key.
//  - the gateway's open API, `POST {gateway}/v1/sessions` (no GATEWAY_API_KEY set);
//  - the gateway's demo mode, `POST {gateway}/demo/sessions`, tried when the API answers 401
//    (GATEWAY_API_KEY set and GATEWAY_DEMO_SESSIONS=true).
// Errors are thrown as Error objects with a `code` (no_capacity, unauthorized, rate_limited, …).

/** Create a session; `gateway` is the gateway's base URL, `options` the SessionConfig fields. */
export async function createSession({ gateway, endpoint = "", options = {} }) {
  if (endpoint) {
    const res = await post(new URL(endpoint, location.href), options);
    if (!res.ok) throw await refusal(res, "your backend");
    const created = await res.json();
    if (!created?.session_id || !created?.token || !created?.ws_url) {
      throw Object.assign(new Error("The session endpoint did not return session_id, token and ws_url."), {
        code: "session_failed",
      });
    }
    return created;
  }
  let res = await post(new URL("v1/sessions", gateway), options);
  if (res.status === 401) {
    const demo = await post(new URL("demo/sessions", gateway), options);
    if (demo.status === 404 || demo.status === 405) {
      // No demo route (the page files answer POST with 405): demo mode is off.
      throw Object.assign(
        new Error(
          "This server requires an API key: sessions must be created by your backend " +
            "(see examples/), or enable the demo page with GATEWAY_DEMO_SESSIONS=true.",
        ),
        { code: "unauthorized" },
      );
    }
    res = demo;
  }
  if (res.ok) return res.json();
  throw await refusal(res, "the server");
}

/** End a session with its own token (no API key needed). */
export function deleteSession(gateway, session, keepalive = false) {
  return fetch(new URL(`v1/sessions/${encodeURIComponent(session.session_id)}`, gateway), {
    method: "DELETE",
    headers: { Authorization: `Bearer ${session.token}` },
    keepalive,
  }).catch(() => {});
}

async function post(url, body) {
  try {
    return await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch {
    throw Object.assign(new Error("The server cannot be reached. Check your connection and try again."), {
      code: "connection_lost",
    });
  }
}

async function refusal(res, who) {
  const detail = await res
    .json()
    .then((b) => (typeof b.detail === "string" ? b.detail : ""))
    .catch(() => "");
  if (res.status === 503) {
    const wait = Number(res.headers.get("Retry-After"));
    const when = wait > 0 && wait <= 120 ? `in ${wait} seconds` : "in a minute";
    return Object.assign(new Error(`All avatars are busy right now. Please try again ${when}.`), {
      code: "no_capacity",
    });
  }
  if (res.status === 401 || res.status === 403) {
    return Object.assign(new Error(detail || "This server requires an API key to start a conversation."), {
      code: "unauthorized",
    });
  }
  if (res.status === 429) {
    return Object.assign(new Error("Too many conversations were started. Please wait a moment."), {
      code: "rate_limited",
    });
  }
  return Object.assign(new Error(detail || `The conversation could not be started (HTTP ${res.status} from ${who}).`), {
    code: "session_failed",
  });
}
