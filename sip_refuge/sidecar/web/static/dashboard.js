// Dashboard: keeps the server-rendered page current without reloading it.
// A server-sent event is only a hint that something changed: the page then re-reads the JSON API and
// re-renders, so a missed or reordered event (or a reconnect) can never leave it showing stale state.
// The markup built here mirrors templates/dashboard.html; change both together.
"use strict";

(() => {
  const names = JSON.parse(document.getElementById("site-data").textContent);
  const steps = JSON.parse(document.getElementById("step-labels").textContent);
  const EVENTS = ["call.queued", "call.answered", "call.ended", "call.unanswered", "post.offline",
    "post.online", "camera.fault", "camera.ok", "selftest.failed", "post.status"];
  // The part of a post a failed self-test names: who has to go and fix it.
  const PARTS = {local: "speaker or microphone", pbx: "network, PBX or media"};
  const THUMB_REFRESH_MS = 30000; // the camera monitor takes a new picture once a probe interval anyway
  const RECONNECT_MS = 5000;
  const TOKEN_KEY = "sip-refuge-token";

  const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  // The JSON API is the sidecar's, but a post's part of it started as that post's report: whatever shape it
  // has, one post must never stop the page showing the others. These read a value as the type expected.
  const list = (v) => (Array.isArray(v) ? v : []);
  const strings = (v) => list(v).filter((f) => typeof f === "string" && f);
  const object = (v) => (v !== null && typeof v === "object" && !Array.isArray(v) ? v : null);
  const str = (v) => (typeof v === "string" ? v : "");
  const badge = (kind, label) => `<span class="badge ${kind}">${esc(label)}</span>`;
  const when = (iso) => (iso ? `<time datetime="${esc(iso)}">${esc(iso)}</time>` : "—");
  const desk = (id) => names.desks[id] || id;

  // Times come as UTC; the control room reads local time, with the date only when it is not today.
  function localTimes(root) {
    const today = new Date().toDateString();
    for (const t of root.querySelectorAll("time[datetime]")) {
      const d = new Date(t.dateTime);
      if (Number.isNaN(d.getTime())) continue;
      const time = d.toLocaleTimeString([], { hour12: false });
      t.textContent = d.toDateString() === today ? time
        : `${d.toLocaleDateString([], { day: "numeric", month: "short" })} ${time}`;
    }
  }

  function postInfo(p) {
    const online = p.online === true ? badge("ok", "Online") : p.online === false ? badge("bad", "Offline")
      : badge("", "Unknown");
    const registered = p.registered === true ? badge("ok", "Yes") : p.registered === false ? badge("bad", "No") : "—";
    const camera = object(p.camera);
    const cam = !camera ? "No camera" : camera.ok === true ? badge("ok", "OK")
      : camera.ok === false ? badge("bad", `Fault: ${str(camera.reason)}`) : badge("", "Not checked yet");
    const t = object(p.last_self_test);
    const part = PARTS[str(t?.part)];
    const test = !t ? "No report" : `${t.passed === true ? badge("ok", "Passed")
      : t.passed === false ? badge("bad", part ? `Failed: ${part}` : "Failed") : badge("", "Unknown")} ${when(str(t.at))}`;
    const c = object(p.call);
    const call = !c ? "None" : c.state === "answered" ? badge("ok", `Answered by ${desk(str(c.desk))}`)
      : badge("wait", "Queued: ringing desks");
    const faultList = strings(p.faults);
    const faults = faultList.length ? `<dt>Faults</dt><dd>${faultList.map((f) => badge("bad", f)).join(" ")}</dd>` : "";
    const press = p.mock_gpio === true
      ? `<button type="button" class="press" data-post="${esc(p.id)}">Press call button (mock)</button>` : "";
    return `<h3>${esc(p.name)}</h3>
      <p class="where">Ext. ${esc(p.extension)} · ${esc(object(p.location)?.address)}</p>
      <dl><dt>Reachable</dt><dd>${online}</dd><dt>Registered</dt><dd>${registered}</dd>
        <dt>State</dt><dd>${esc(str(p.state) || "—")}</dd><dt>Camera</dt><dd>${cam}</dd>
        <dt>Self-test</dt><dd>${test}</dd><dt>Call</dt><dd>${call}</dd>${faults}</dl>${press}`;
  }

  function postClass(p) {
    const t = object(p.last_self_test);
    const fault = p.online === false || object(p.camera)?.ok === false || strings(p.faults).length
      || t?.passed === false;
    return `post ${object(p.call) ? "calling" : fault ? "fault" : ""}`;
  }

  // Writes only real changes: re-writing a live region would make a screen reader announce it again.
  function put(el, html) {
    if (el.dataset.html !== html) {
      el.innerHTML = html;
      el.dataset.html = html;
      localTimes(el);
    }
  }

  function renderCalls(calls) {
    const items = list(calls).map(object).filter(Boolean).map((c) => `<li class="${esc(c.state)}" data-incident="${esc(c.incident)}">`
      + `<strong>${esc(c.post_name)}</strong>: `
      + `${c.state === "answered" ? `answered by ${esc(desk(c.desk))}` : "waiting, ringing desks"}</li>`);
    put(document.getElementById("calls"), items.join("") || '<li class="none">No calls in progress</li>');
  }

  function renderPosts(posts) {
    for (const p of list(posts).map(object).filter(Boolean)) {
      const card = document.getElementById(`post-${str(p.id)}`);
      if (!card) continue; // posts come from the site file: a new one needs a restart and a reload anyway
      card.className = postClass(p);
      put(card.querySelector(".post-info"), postInfo(p));
    }
  }

  function outcome(i) {
    if (i.outcome === "ended") return badge("", "Ended");
    if (i.outcome) return badge("bad", i.outcome.charAt(0).toUpperCase() + i.outcome.slice(1));
    return i.state === "answered" ? badge("ok", "Connected") : badge("wait", "Waiting");
  }

  function step(t) {
    const d = t.detail || {};
    return `<li>${when(t.at)} ${esc(steps[t.kind] || t.kind)}${d.desk ? `: ${esc(desk(d.desk))}` : ""}`
      + `${d.outcome ? ` (${esc(d.outcome)})` : ""}</li>`;
  }

  function renderIncidents(incidents) {
    const body = document.getElementById("incidents");
    // Keep open the timelines the operator opened.
    const open = new Set([...body.querySelectorAll("details[open]")].map((d) => d.closest("tr").dataset.incident));
    const rows = incidents.map((i) => `<tr data-incident="${esc(i.id)}"><td>${when(i.created)}</td>`
      + `<td>${esc(names.posts[i.post_id] || i.post_id)}</td><td>${outcome(i)}</td>`
      + `<td>${i.answered_by ? esc(desk(i.answered_by)) : "—"}</td>`
      + `<td><details${open.has(i.id) ? " open" : ""}><summary>${i.timeline.length} steps</summary>`
      + `<ol class="timeline">${i.timeline.map(step).join("")}</ol></details></td></tr>`);
    put(body, rows.join("") || '<tr><td colspan="5" class="empty">No calls yet</td></tr>');
  }

  async function getJson(url) {
    const reply = await fetch(url, { cache: "no-store" });
    if (!reply.ok) throw new Error(`${url}: HTTP ${reply.status}`);
    return reply.json();
  }

  // One refresh at a time; events that arrive meanwhile fold into one more round.
  let busy = false;
  let again = false;
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      do {
        again = false;
        const [p, i] = await Promise.all([getJson("/api/v1/posts"), getJson("/api/v1/incidents?limit=50")]);
        renderCalls(p.calls);
        renderPosts(p.posts);
        renderIncidents(i.incidents);
      } while (again);
    } catch (err) {
      setLink("lost", "Cannot read the sidecar: the page may be out of date");
      console.error(err);
    } finally {
      busy = false;
    }
  }

  const link = document.getElementById("link-state");
  function setLink(state, text) {
    link.dataset.state = state;
    link.textContent = text;
  }

  function connect() {
    const source = new EventSource("/api/v1/events");
    source.onopen = () => { setLink("open", "Live"); refresh(); }; // catch up on whatever a gap missed
    source.onerror = () => {
      setLink("lost", "Connection to the sidecar lost: reconnecting…");
      // EventSource retries by itself, except after an HTTP error: then start again a little later.
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, RECONNECT_MS);
    };
    for (const type of EVENTS) source.addEventListener(type, refresh);
    // A camera fault is best seen in its picture: fetch the one the probe just took.
    for (const type of ["camera.fault", "camera.ok"]) source.addEventListener(type, reloadThumbs);
  }

  // Camera thumbnails: a missing picture (404 until the first probe) shows words instead of a broken image.
  function markThumb(img) {
    const figure = img.closest(".thumb");
    if (img.complete && img.naturalWidth === 0) figure.dataset.missing = "";
    else delete figure.dataset.missing;
  }
  document.addEventListener("error", (e) => { if (e.target.matches?.(".thumb img")) markThumb(e.target); }, true);
  document.addEventListener("load", (e) => { if (e.target.matches?.(".thumb img")) markThumb(e.target); }, true);
  document.querySelectorAll(".thumb img").forEach((img) => { if (img.complete) markThumb(img); });
  function reloadThumbs() {
    for (const img of document.querySelectorAll(".thumb img")) img.src = `${img.src.split("?")[0]}?t=${Date.now()}`;
  }
  setInterval(reloadThumbs, THUMB_REFRESH_MS);

  // Mock posts only: press the call button from here (for demos and tests). The token is asked once per tab.
  const notice = (text) => { document.getElementById("press-notice").textContent = text; };
  document.addEventListener("click", async (e) => {
    const button = e.target.closest("button.press");
    if (!button) return;
    const post = button.dataset.post;
    const token = sessionStorage.getItem(TOKEN_KEY) || prompt("Sidecar API token (kept only in this browser tab):");
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    try {
      const reply = await fetch(`/api/v1/posts/${encodeURIComponent(post)}/press`,
        { method: "POST", headers: { Authorization: `Bearer ${token}` } });
      if (reply.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        notice("The token was refused: press again to enter it.");
      } else if (reply.status === 404 || reply.status === 405) {
        notice("This sidecar cannot press a post's button.");
      } else {
        notice(reply.ok ? `Pressed the call button of ${names.posts[post]}.` : `Press failed: HTTP ${reply.status}.`);
      }
    } catch (err) {
      notice("Press failed: the sidecar did not answer.");
    }
  });

  localTimes(document);
  connect();
})();
