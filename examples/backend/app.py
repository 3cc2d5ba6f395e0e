"""Your product's backend, in miniature: it creates avatar sessions with the gateway's API key and
hands its page only the session (id, token, ws_url). The page embeds <avatar-stack-avatar>.

    GATEWAY_URL=http://127.0.0.1:8000 GATEWAY_API_KEY=change-me \\
        uvicorn app:app --app-dir examples/backend --port 8080

and on the gateway: GATEWAY_API_KEY=change-me ALLOWED_ORIGINS=http://localhost:8080 avatar-stack up
Then open http://localhost:8080. Needs only fastapi, uvicorn and httpx (not avatar-stack itself).
"""

from __future__ import annotations

import html
import os

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse

GATEWAY_URL = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000").rstrip("/")  # what this server calls
GATEWAY_PUBLIC_URL = os.environ.get("GATEWAY_PUBLIC_URL", GATEWAY_URL).rstrip("/")  # what the page loads
API_KEY = os.environ.get("GATEWAY_API_KEY", "")

app = FastAPI(title="avatar-stack example backend")

PAGE = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8" />
    <title>My product, with an avatar</title>
    <script type="module" src="{gateway}/widget.js"></script>
    <style>body {{ font-family: system-ui, sans-serif; margin: 2rem; }}</style>
  </head>
  <body>
    <h1>Ask our avatar</h1>
    <avatar-stack-avatar id="avatar" session-endpoint="/api/avatar-session" captions></avatar-stack-avatar>
    <ol id="log"></ol>
    <script>
      const log = (text) => {{
        const li = document.createElement("li");
        li.textContent = text;
        document.getElementById("log").append(li);
      }};
      const avatar = document.getElementById("avatar");
      avatar.addEventListener("avatar-stack:transcript", (e) => {{
        if (e.detail.final && e.detail.text) log(`You: ${{e.detail.text}}`);
      }});
      avatar.addEventListener("avatar-stack:reply", (e) => log(`Avatar: ${{e.detail.text}}`));
      avatar.addEventListener("avatar-stack:error", (e) => log(`Error ${{e.detail.code}}: ${{e.detail.message}}`));
    </script>
  </body>
</html>
"""


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE.format(gateway=html.escape(GATEWAY_PUBLIC_URL, quote=True))


@app.post("/api/avatar-session")
async def avatar_session(request: Request) -> dict[str, str]:
    """Authenticate your user here (cookie, session…); then create their avatar session."""
    options = await request.json() if await request.body() else {}
    body = {k: v for k, v in options.items() if k in ("avatar_id", "voice_id", "language")}
    headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(f"{GATEWAY_URL}/v1/sessions", json=body, headers=headers)
    if resp.status_code != 201:
        raise HTTPException(resp.status_code, resp.json().get("detail", "the avatar service refused"))
    created = resp.json()
    # Only what the page needs: never the API key.
    return {"session_id": created["session_id"], "token": created["token"], "ws_url": created["ws_url"]}
