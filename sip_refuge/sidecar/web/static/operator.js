// Operator pop-up: every live call in a list (longest waiting first), and the selected one's live camera,
// details and actions. The call.* events drive it directly (no request before the camera opens: every
// millisecond counts here); each event, and every (re)connection, is followed by a re-read of the JSON API,
// which corrects whatever an event alone cannot know (times, other desks' calls, missed calls).
"use strict";

(() => {
  const ui = window.refugeUi;
  const { esc, list, object, str, desk: deskName, when, clock, duration, put, getJson, badge } = ui;
  const DESK = document.getElementById("operator").dataset.desk;
  const LINGER_MS = 8000; // an ended call stays on screen this long, so the operator sees how it ended
  const RECONNECT_MS = 5000;
  const RECENT = 10; // ended calls listed under the live ones
  const $ = (id) => document.getElementById(id);
  window.refugeConsole.forDesk(DESK);

  // incident -> {incident, reference, post: {id, name, location}, camera: {ok, reason} | null, state, desk,
  //              queuedAt, answeredAt, overflowedAt, waitSeconds, alarm, acknowledgedBy, acknowledgedAt}
  const calls = new Map();
  const finished = new Set(); // incidents seen ending: a re-read that raced the end must not revive them
  let missed = []; // calls over that no desk answered and nobody acknowledged: they still sound the alarm
  let posts = {}; // post id -> post JSON from the API (the call-back extension, camera status)
  let events = 0; // counts call events, so a re-read knows whether one arrived while it was reading
  let chosen = null; // the call the operator selected; else pick() decides
  let lingering = null;
  let lingered = null; // the ended call shown while lingering

  const ordered = () => [...calls.values()].sort((a, b) => Date.parse(a.queuedAt) - Date.parse(b.queuedAt));

  // Which call to show: the one the operator selected, else the one this desk answered, else the one that
  // has waited longest for an answer, else the first.
  function pick() {
    const live = ordered();
    return calls.get(chosen) || live.find((c) => c.desk === DESK) || live.find((c) => c.alarm) || live[0] || null;
  }

  function show() {
    if (chosen && !calls.has(chosen)) chosen = null;
    const call = pick();
    if (call) {
      clearTimeout(lingering);
      lingering = null;
      lingered = null;
    }
    renderList(call);
    if (call) render(call);
    else if (!lingering) render(null);
    else render(lingered);
    window.refugeConsole.set(alarms());
  }

  function alarms() {
    const live = ordered().filter((c) => c.alarm).map((c) => ({ incident: c.incident, name: c.post.name,
      reference: c.reference, why: c.state === "overflowed" ? "overflowed: the caller is on the overflow route"
        : "ringing the desks" }));
    return [...live, ...missed.filter((m) => !calls.has(m.incident)).map((m) => ({ ...m,
      why: "missed: the caller hung up before any desk answered" }))];
  }

  function stateText(call) {
    switch (call.state) {
      case "queued": return "Ringing the desks";
      case "answered": return `Answered by ${deskName(call.desk)}${call.desk === DESK ? " (this desk)" : ""}`;
      case "overflowed": return "Overflowed: the caller is on the overflow route";
      case "unanswered": return `Not answered: ${call.reason || "unanswered"}`;
      default: return "Ended";
    }
  }

  function bannerFor(call) {
    const name = call.post.name;
    switch (call.state) {
      case "queued": return ["queued", `Refuge call from ${name}: ringing, answer your phone`];
      case "answered": return call.desk === DESK ? ["answered-here", `You answered the call from ${name}`]
        : ["answered", `${deskName(call.desk)} answered the call from ${name}`];
      case "overflowed": return ["overflowed", `Call from ${name} overflowed: the caller is on the overflow route`];
      case "unanswered": return ["unanswered", `Call from ${name} not answered (${call.reason || "unanswered"})`];
      default: return ["ended", `Call from ${name} ended`];
    }
  }

  const cameraWords = (call) => {
    if (!call.camera) return "No camera";
    if (call.camera.ok === false) return badge("bad", `Fault: ${str(call.camera.reason)}`);
    return call.camera.ok === true ? badge("ok", "OK") : badge("", "Not checked yet");
  };

  function waitHtml(call) {
    // The clock's text is filled in by common.js's tick(), once a second: the markup itself stays the same.
    if (call.state === "queued") return `<span data-since="${esc(call.queuedAt)}"></span>`;
    if (call.state === "answered") return `${duration(call.waitSeconds)} until answered`;
    if (call.state === "overflowed") return `${duration(call.waitSeconds)}, then the overflow route`;
    return "—";
  }

  function renderList(selected) {
    const live = ordered();
    $("call-count").textContent = live.length ? `(${live.length})` : "";
    $("no-calls").hidden = live.length > 0;
    const rows = live.map((c) => {
      const thumb = c.camera
        ? `<span class="mini"><img src="/cameras/${encodeURIComponent(c.post.id)}/thumbnail.jpg?call=${encodeURIComponent(c.incident)}" alt=""></span>`
        : '<span class="mini none">No camera</span>';
      const fault = c.camera?.ok === false ? ` ${badge("bad", "Camera fault")}` : "";
      const words = c.state === "queued" ? "Ringing" : c.state === "answered" ? `Answered by ${deskName(c.desk)}`
        : "Overflow route";
      return `<li><button type="button" class="call-row ${esc(c.state)}" data-incident="${esc(c.incident)}" `
        + `data-alarm="${c.alarm ? "on" : "off"}" aria-pressed="${c === selected}">${thumb}`
        + `<span class="row-text"><span class="row-name"><strong>${esc(c.post.name)}</strong>`
        + `${c.reference ? ` <span class="ref">${esc(c.reference)}</span>` : ""}</span>`
        + `<span class="row-state">${esc(words)} · ${waitHtml(c)}${fault}</span></span></button></li>`;
    });
    put($("call-list"), rows.join(""));
  }

  function render(call) {
    const banner = $("banner");
    $("idle").hidden = Boolean(call);
    $("call-view").hidden = !call;
    if (!call) {
      banner.dataset.state = "idle";
      banner.textContent = "Waiting for calls";
      delete banner.dataset.incident;
      setCamera(null);
      return;
    }
    const [state, text] = bannerFor(call);
    banner.dataset.state = state;
    banner.dataset.incident = call.incident;
    if (banner.textContent !== text) banner.textContent = text;
    const { id, name } = call.post;
    const location = object(call.post.location) || {};
    $("post-name").textContent = name;
    $("post-address").textContent = str(location.address);
    $("post-coords").textContent = Number.isFinite(location.lat) && Number.isFinite(location.lon)
      ? `${location.lat.toFixed(5)}, ${location.lon.toFixed(5)}` : "";
    $("call-state").textContent = stateText(call);
    put($("call-wait"), waitHtml(call));
    $("call-since").textContent = call.queuedAt ? clock(call.queuedAt) : "—";
    $("call-answered").textContent = call.answeredAt ? clock(call.answeredAt) : "—";
    put($("call-camera"), cameraWords(call));
    $("post-extension").textContent = str(posts[id]?.extension) ? `dial ${posts[id].extension}` : "—";
    put($("incident"), `${call.reference ? `<strong>${esc(call.reference)}</strong> ` : ""}<code class="uuid">${esc(call.incident)}</code>`);
    const ack = $("acknowledge");
    ack.hidden = !call.alarm;
    ack.dataset.incident = call.incident;
    $("acknowledged").textContent = call.acknowledgedBy
      ? `Alarm acknowledged by ${call.acknowledgedBy}${call.acknowledgedAt ? ` at ${clock(call.acknowledgedAt)}` : ""}` : "";
    setCamera(call.camera && ["queued", "answered", "overflowed"].includes(call.state) ? call.post : null);
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

  function fromEvent(e) {
    const body = object(JSON.parse(e.data)) || {};
    return [str(body.type), object(body.data) || {}, str(body.timestamp)];
  }

  function onCall(e) {
    events += 1;
    const [type, d, at] = fromEvent(e);
    const known = calls.get(d.incident);
    const camera = object(object(d.camera))?.rtsp_url ? (object(posts[object(d.post)?.id]?.camera) || { ok: null }) : null;
    if (type === "call.queued") {
      calls.set(d.incident, { incident: d.incident, reference: str(d.reference), post: object(d.post) || {},
        camera, state: "queued", desk: null, queuedAt: at, answeredAt: null, overflowedAt: null, waitSeconds: 0,
        alarm: true, acknowledgedBy: null, acknowledgedAt: null });
    } else if (type === "call.answered") {
      const base = known || { incident: d.incident, reference: str(d.reference), post: object(d.post) || {}, camera,
        queuedAt: at, acknowledgedBy: null };
      calls.set(d.incident, { ...base, state: "answered", desk: object(d.desk)?.id || null, answeredAt: at,
        waitSeconds: Number(d.wait_seconds) || 0, alarm: false });
    } else if (type === "call.unanswered" && d.reason === "overflowed") {
      if (known) {
        calls.set(d.incident, { ...known, state: "overflowed", overflowedAt: at,
          waitSeconds: Number(d.duration_seconds) || 0, alarm: !known.acknowledgedBy });
      }
    } else {
      finished.add(d.incident);
      calls.delete(d.incident);
      if (known && !known.acknowledgedBy && !known.answeredAt) missed.push({ incident: d.incident,
        name: known.post.name, reference: known.reference });
      if (known && $("banner").dataset.incident === d.incident && !calls.size) {
        clearTimeout(lingering);
        lingered = { ...known, state: type === "call.ended" ? "ended" : "unanswered", reason: d.reason, alarm: false };
        lingering = setTimeout(() => { lingering = null; lingered = null; show(); }, LINGER_MS);
      }
    }
    show();
    refresh();
  }

  function onAcknowledged(e) {
    const [, d, at] = fromEvent(e);
    const known = calls.get(d.incident);
    if (known) calls.set(d.incident, { ...known, alarm: false, acknowledgedBy: str(d.acknowledged_by), acknowledgedAt: at });
    missed = missed.filter((m) => m.incident !== d.incident);
    show();
    refresh();
  }

  function fromApi(c, before) {
    const p = Object.hasOwn(posts, c.post) ? posts[c.post] : null;
    if (!p) return null;
    const camera = c.camera === null ? null : object(c.camera) || { ok: null };
    return { incident: c.incident, reference: str(c.reference), post: { id: p.id, name: str(p.name) || str(c.post_name),
      location: p.location }, camera, state: str(c.state), desk: str(c.desk) || null,
    queuedAt: str(c.queued_at) || before?.queuedAt || null, answeredAt: str(c.answered_at) || null,
    overflowedAt: str(c.overflowed_at) || null, waitSeconds: Number(c.wait_seconds) || 0, alarm: c.alarm === true,
    acknowledgedBy: str(c.acknowledged_by) || null, acknowledgedAt: str(c.acknowledged_at) || null };
  }

  function renderRecent(incidents) {
    const ended = incidents.filter((i) => i.state === "ended").slice(0, RECENT);
    const outcome = (i) => (i.outcome === "ended" ? `Answered by ${esc(deskName(i.answered_by))}`
      : i.outcome === "overflowed" ? badge("bad", "Overflowed") : badge("bad", i.outcome === "abandoned"
        ? "Abandoned" : str(i.outcome) || "Ended"))
      + (i.acknowledged_by ? ` <span class="acked">acknowledged by ${esc(i.acknowledged_by)}</span>` : "");
    put($("recent"), ended.map((i) => `<tr data-incident="${esc(i.id)}"><td>${when(i.created)}</td>`
      + `<td class="reference"><strong>${esc(i.reference || "—")}</strong><br><code class="uuid">${esc(i.id)}</code></td>`
      + `<td>${esc(ui.post(i.post_id))}</td><td>${outcome(i)}</td>`
      + `<td class="closeout-cell">${ui.closeoutCell(i)}</td></tr>`).join("")
      || '<tr><td colspan="5" class="empty">No calls yet</td></tr>');
  }

  // One re-read at a time; events that arrive meanwhile fold into one more round.
  let busy = false;
  let again = false;
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      do {
        again = false;
        const seen = events;
        const [body, history] = await Promise.all([getJson("/api/v1/posts"), getJson("/api/v1/incidents?limit=30")]);
        const overview = object(body) || {};
        ui.serverNow(overview.now);
        posts = Object.fromEntries(list(overview.posts).map(object).filter((p) => p && str(p.id)).map((p) => [p.id, p]));
        // If an event came in while reading, it is newer than this answer: only add calls, never drop one.
        const before = new Map(calls);
        if (events === seen) calls.clear();
        for (const c of list(overview.calls).map(object).filter(Boolean)) {
          if (finished.has(c.incident)) continue;
          const call = fromApi(c, before.get(c.incident));
          if (call) calls.set(call.incident, call);
        }
        missed = list(overview.missed).map(object).filter(Boolean).map((m) => ({ incident: str(m.incident),
          name: str(m.post_name), reference: str(m.reference) }));
        renderRecent(list(object(history)?.incidents).map(object).filter(Boolean));
        show();
      } while (again);
    } catch (err) {
      console.error(err);
    } finally {
      busy = false;
    }
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
      refresh();
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
    source.addEventListener("incident.acknowledged", onAcknowledged);
    for (const type of ["incident.closed", "camera.fault", "camera.ok", "call.updated"]) {
      source.addEventListener(type, refresh);
    }
  }

  $("call-list").addEventListener("click", (e) => {
    const row = e.target.closest("button.call-row[data-incident]");
    if (!row) return;
    chosen = row.dataset.incident;
    show();
  });
  $("acknowledge").addEventListener("click", (e) => window.refugeConsole.acknowledge(e.currentTarget.dataset.incident));
  // A thumbnail not taken yet (404 until the camera's first probe) shows words instead of a broken image.
  document.addEventListener("error", (e) => { if (e.target.matches?.(".mini img")) e.target.closest(".mini").dataset.missing = ""; }, true);
  document.addEventListener("refuge:closed", refresh);

  connect();
})();
