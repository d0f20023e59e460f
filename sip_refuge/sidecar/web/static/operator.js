// Operator pop-up: shows the calling post and its live camera the moment a call is queued.
// The call.* events drive it directly (no extra request before the camera opens: every millisecond
// counts here); on every (re)connection it re-reads the live calls from the JSON API to catch up.
"use strict";

(() => {
  const names = JSON.parse(document.getElementById("site-data").textContent);
  const DESK = document.getElementById("operator").dataset.desk;
  const LINGER_MS = 8000; // an ended call stays on screen this long, so the operator sees how it ended
  const RECONNECT_MS = 5000;
  const $ = (id) => document.getElementById(id);
  const deskName = (id) => names.desks[id] || id;
  // The JSON API is the sidecar's, but parts of it started as a post's report: read every value as the type
  // expected, so no answer can stop this page from showing a call.
  const list = (v) => (Array.isArray(v) ? v : []);
  const object = (v) => (v !== null && typeof v === "object" && !Array.isArray(v) ? v : null);
  const str = (v) => (typeof v === "string" ? v : "");

  const calls = new Map(); // incident id -> {incident, post: {id, name, location}, camera, state, desk, since}
  const finished = new Set(); // incidents seen ending: a catch-up that raced the end must not revive them
  let posts = {}; // post id -> post JSON from the API (for the call-back extension)
  let events = 0; // counts call events, so a catch-up knows whether one arrived while it was reading
  let lingering = null;

  // Which call to show when several are live: the one this desk answered, else the newest still ringing.
  function pick() {
    const live = [...calls.values()];
    return live.find((c) => c.desk === DESK) || live.filter((c) => c.state === "queued").pop()
      || live.pop() || null;
  }

  function show() {
    const call = pick();
    if (call) {
      clearTimeout(lingering);
      lingering = null;
      render(call);
    } else if (!lingering) {
      render(null);
    }
  }

  function bannerFor(call) {
    const name = call.post.name;
    switch (call.state) {
      case "queued": return ["queued", `Refuge call from ${name}: ringing, answer your phone`];
      case "answered": return call.desk === DESK ? ["answered-here", `You answered the call from ${name}`]
        : ["answered", `${deskName(call.desk)} answered the call from ${name}`];
      case "unanswered": return ["unanswered", `Call from ${name} not answered (${call.reason || "unanswered"})`];
      default: return ["ended", `Call from ${name} ended`];
    }
  }

  function stateText(call) {
    switch (call.state) {
      case "queued": return "Ringing the desks";
      case "answered": return `Answered by ${deskName(call.desk)}${call.desk === DESK ? " (this desk)" : ""}`;
      case "unanswered": return `Not answered: ${call.reason || "unanswered"}`;
      default: return "Ended";
    }
  }

  function render(call) {
    const banner = $("banner");
    $("idle").hidden = Boolean(call);
    $("call-view").hidden = !call;
    if (!call) {
      banner.dataset.state = "idle";
      banner.textContent = "Waiting for calls";
      setCamera(null);
      return;
    }
    const [state, text] = bannerFor(call);
    banner.dataset.state = state;
    banner.dataset.incident = call.incident;
    banner.textContent = text;
    const { id, name } = call.post;
    const location = object(call.post.location) || {};
    $("post-name").textContent = name;
    $("post-address").textContent = str(location.address);
    const coords = $("post-coords");
    coords.textContent = "";
    if (Number.isFinite(location.lat) && Number.isFinite(location.lon)) {
      const map = document.createElement("a");
      const { lat, lon } = location;
      map.href = `https://www.openstreetmap.org/?mlat=${lat}&mlon=${lon}#map=18/${lat}/${lon}`;
      map.target = "_blank";
      map.rel = "noopener";
      map.textContent = `${location.lat.toFixed(5)}, ${location.lon.toFixed(5)} (map)`;
      coords.append(map);
    }
    $("call-state").textContent = stateText(call);
    $("call-since").textContent = call.since ? new Date(call.since).toLocaleTimeString([], { hour12: false }) : "—";
    $("post-extension").textContent = str(posts[id]?.extension) ? `dial ${posts[id].extension}` : "—";
    $("incident").textContent = call.incident;
    const others = [...calls.values()].filter((c) => c.incident !== call.incident).map((c) => c.post.name);
    $("others").textContent = others.length ? `Also calling: ${others.join(", ")}` : "";
    setCamera(call.camera ? call.post : null);
  }

  // Only a change of post touches the image: re-setting src would reopen the camera stream.
  function setCamera(post) {
    const img = $("camera");
    const id = post ? post.id : "";
    $("no-camera").hidden = Boolean(post);
    if (img.dataset.post === id) return;
    img.dataset.post = id;
    img.hidden = !post;
    if (post) {
      img.alt = `Live camera at ${post.name}`;
      // A URL of its own: Chromium holds a request for a URL already loading (its cache lock) until the
      // first one's headers arrive, i.e. until a second window's camera has sent its first frame.
      img.src = `/cameras/${encodeURIComponent(post.id)}/live.mjpeg?view=${Date.now()}`;
    } else {
      img.removeAttribute("src"); // ends the MJPEG request, so the sidecar stops decoding the stream
    }
  }

  function onCall(e) {
    events += 1;
    const body = JSON.parse(e.data);
    const d = body.data;
    const known = calls.get(d.incident);
    if (body.type === "call.queued") {
      calls.set(d.incident, { incident: d.incident, post: d.post, camera: Boolean(d.camera && d.camera.rtsp_url),
        state: "queued", desk: null, since: body.timestamp });
    } else if (body.type === "call.answered") {
      const camera = Boolean(d.camera && d.camera.rtsp_url);
      calls.set(d.incident, { ...(known || { incident: d.incident, post: d.post, camera }),
        state: "answered", desk: d.desk && d.desk.id });
    } else {
      finished.add(d.incident);
      calls.delete(d.incident);
      if (known && $("banner").dataset.incident === d.incident && !calls.size) {
        clearTimeout(lingering);
        render({ ...known, state: body.type === "call.ended" ? "ended" : "unanswered", reason: d.reason });
        lingering = setTimeout(() => { lingering = null; show(); }, LINGER_MS);
        return;
      }
    }
    show();
  }

  async function catchUp() {
    const seen = events;
    const reply = await fetch("/api/v1/posts", { cache: "no-store" });
    if (reply.status === 401) window.refuge?.toLogin(); // the session is over: log in again
    if (!reply.ok) return;
    const body = object(await reply.json()) || {};
    posts = Object.fromEntries(list(body.posts).map(object).filter((p) => p && str(p.id)).map((p) => [p.id, p]));
    // If an event came in while reading, it is newer than this answer: only add calls, never drop one.
    const before = new Map(calls);
    if (events === seen) calls.clear();
    for (const c of list(body.calls).map(object).filter(Boolean)) {
      const p = Object.hasOwn(posts, c.post) ? posts[c.post] : null;
      if (finished.has(c.incident) || !p) continue;
      const since = before.has(c.incident) ? before.get(c.incident).since : null;
      calls.set(c.incident, { incident: c.incident, post: { id: p.id, name: str(p.name), location: p.location },
        camera: p.camera != null, state: c.state, desk: c.desk, since });
    }
    show();
  }

  const link = $("link-state");
  function setLink(state, text) {
    link.dataset.state = state;
    link.textContent = text;
  }

  function connect() {
    const source = new EventSource("/api/v1/events");
    source.onopen = () => {
      setLink("open", "Live");
      catchUp().catch((err) => console.error(err));
    };
    source.onerror = () => {
      setLink("lost", "Connection to the sidecar lost: reconnecting…");
      if (source.readyState === EventSource.CLOSED) { // an HTTP error: a 401 sends the page to the login
        window.refuge?.checkSession();
        setTimeout(connect, RECONNECT_MS);
      }
    };
    for (const type of ["call.queued", "call.answered", "call.ended", "call.unanswered"]) {
      source.addEventListener(type, onCall);
    }
  }

  connect();
})();
