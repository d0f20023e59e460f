// Dashboard: keeps the server-rendered page current without reloading it.
// A server-sent event is only a hint that something changed: the page then re-reads the JSON API and
// re-renders, so a missed or reordered event (or a reconnect) can never leave it showing stale state.
// The markup built here mirrors templates/dashboard.html; change both together.
"use strict";

(() => {
  const ui = window.refugeUi;
  const { esc, list, object, str, strings, plural, desk, post, reason, when, duration, put, getJson, badge,
    closeoutCell } = ui;
  const steps = ui.names.steps;
  const EVENTS = ["call.queued", "call.answered", "call.ended", "call.unanswered", "post.offline",
    "post.online", "camera.fault", "camera.ok", "selftest.failed", "post.status", "incident.closed",
    "incident.acknowledged", "call.updated", "post.fault", "post.ok"];
  // The part of a post a failed self-test names: who has to go and fix it.
  const PARTS = {local: "speaker or microphone", pbx: "network, PBX or media"};
  const THUMB_REFRESH_MS = 30000; // the camera monitor takes a new picture once a probe interval anyway
  // The sidecar's own problems (AMI lost, a CCTV target down, the disk full) come with no event: read again.
  const PROBLEMS_REFRESH_MS = 15000;
  const RECONNECT_MS = 5000;
  const STATE_WORDS = { offline: "Offline", calling: "Calling", answered: "Answered", fault: "Fault",
    unknown: "Not heard from yet", idle: "Idle" };

  const cameraFault = (c) => object(c.camera)?.ok === false;

  function hasFault(p) {
    const t = object(p.last_self_test);
    return cameraFault(p) || strings(p.faults).length > 0 || t?.passed === false;
  }

  // A post's colour on the site plan: the rule of sidecar/siteplan.py's state_of; keep the two in step.
  function planState(p) {
    const c = object(p.call);
    if (p.online === false) return "offline";
    if (c) return c.state === "answered" ? "answered" : "calling";
    if (hasFault(p)) return "fault";
    return p.online === true ? "idle" : "unknown";
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
      : c.state === "overflowed" ? badge("bad", "Overflowed: on the overflow route")
      : badge("wait", "Queued: ringing desks");
    const faultList = strings(p.faults);
    const faults = faultList.length ? `<dt>Faults</dt><dd>${faultList.map((f) => badge("bad", f)).join(" ")}</dd>` : "";
    const press = p.mock_gpio === true
      ? `<button type="button" class="press" data-post="${esc(p.id)}">Press call button (mock)</button>` : "";
    return `<h3>${esc(p.name)}${c && cameraFault(p) ? ` ${badge("bad", "Camera fault")}` : ""}</h3>
      <p class="where">Ext. ${esc(p.extension)} · ${esc(object(p.location)?.address)}</p>
      <dl><dt>Reachable</dt><dd>${online}</dd><dt>Registered</dt><dd>${registered}</dd>
        <dt>State</dt><dd>${esc(str(p.state) || "—")}</dd><dt>Camera</dt><dd>${cam}</dd>
        <dt>Self-test</dt><dd>${test}</dd><dt>Call</dt><dd>${call}</dd>${faults}</dl>${press}`;
  }

  function postClass(p) {
    const fault = p.online === false || hasFault(p);
    return `post${object(p.call) ? " calling" : ""}${fault ? " fault" : ""}`;
  }

  function callItem(c) {
    const wait = duration(c.wait_seconds);
    const rung = list(c.rung).length;
    const what = c.state === "answered" ? `answered by ${esc(desk(str(c.desk)))} after ${wait}`
      : c.state === "overflowed" ? `overflowed after ${wait}: the caller is on the overflow route`
      // The clock is filled in by common.js's tick(), and hidden from screen readers: this list is a live
      // region, which would otherwise be read out again every second.
      : `waiting <span class="wait" data-since="${esc(c.queued_at)}" aria-hidden="true"></span>, ringing desks`
        + (rung ? ` (rang ${plural(rung, "desk")})` : "");
    const camera = cameraFault(c) ? ` ${badge("bad", `Camera fault: ${str(object(c.camera).reason)}`)}` : "";
    const acked = str(c.acknowledged_by) ? ` <span class="acked">acknowledged by ${esc(c.acknowledged_by)}</span>` : "";
    return `<li class="${esc(c.state)}" data-incident="${esc(c.incident)}" data-alarm="${c.alarm === true ? "on" : "off"}">`
      + `<strong>${esc(c.post_name)}</strong>${str(c.reference) ? ` <span class="ref">${esc(c.reference)}</span>` : ""}: `
      + `${what}${camera}${acked}</li>`;
  }

  // A PBX of the pair that is down; empty (and so hidden) while both are up, or on a site with one PBX.
  function renderPbx(pbx) {
    const down = Object.entries(pbx).map(([role, p]) => [role, object(p)]).filter(([, p]) => p && p.up === false);
    document.getElementById("pbx-state").textContent = down.map(([role, p]) =>
      `The ${role} PBX (${str(p.host)}) is down since ${str(p.since) || "the sidecar started"}: `
      + "alarms go through the other PBX of the pair.").join(" ");
  }

  function renderCalls(calls) {
    const items = list(calls).map(object).filter(Boolean).map(callItem);
    put(document.getElementById("calls"), items.join("") || '<li class="none">No calls in progress</li>');
  }

  function renderPosts(posts) {
    for (const p of list(posts).map(object).filter(Boolean)) {
      const card = document.getElementById(`post-${str(p.id)}`);
      if (!card) continue; // posts come from the site file: a new one needs a restart and a reload anyway
      card.className = postClass(p);
      put(card.querySelector(".post-info"), postInfo(p));
      const marker = document.getElementById(`marker-${str(p.id)}`);
      if (marker) {
        const state = planState(p);
        const fault = hasFault(p) && state !== "fault";
        marker.setAttribute("class", `marker ${state}${hasFault(p) ? " has-fault" : ""}`);
        marker.dataset.state = state;
        marker.querySelector("title").textContent = `${str(p.name)}: ${STATE_WORDS[state]}${fault ? ", fault" : ""}`;
      }
    }
  }

  function outcome(i) {
    const acked = str(i.acknowledged_by) ? ` <span class="acked">acknowledged by ${esc(i.acknowledged_by)}</span>` : "";
    if (i.outcome === "ended") return badge("", "Ended") + acked;
    if (i.outcome) return badge("bad", i.outcome.charAt(0).toUpperCase() + i.outcome.slice(1)) + acked;
    return (i.state === "answered" ? badge("ok", "Connected")
      : i.state === "overflowed" ? badge("bad", "Overflowed: on the overflow route") : badge("wait", "Waiting")) + acked;
  }

  function step(t) {
    const d = object(t.detail) || {};
    return `<li>${when(t.at)} ${esc(steps[t.kind] || t.kind)}${d.by ? ` ${esc(d.by)}` : ""}`
      + `${d.desk ? `${t.kind === "acknowledged" ? " at " : ": "}${esc(desk(d.desk))}` : ""}`
      + `${d.reason && t.kind === "closed" ? `: ${esc(reason(d.reason))}` : ""}`
      + `${d.outcome ? ` (${esc(d.outcome)})` : ""}</li>`;
  }

  function renderIncidents(incidents) {
    const body = document.getElementById("incidents");
    // Keep open the timelines the operator opened.
    const open = new Set([...body.querySelectorAll("details[open]")].map((d) => d.closest("tr").dataset.incident));
    const rows = incidents.map((i) => `<tr data-incident="${esc(i.id)}"><td>${when(i.created)}</td>`
      + `<td class="reference"><strong>${esc(i.reference || "—")}</strong><br><code class="uuid">${esc(i.id)}</code></td>`
      + `<td>${esc(post(i.post_id))}</td><td>${outcome(i)}</td>`
      + `<td>${i.answered_by ? esc(desk(i.answered_by)) : "—"}</td>`
      + `<td><details${open.has(i.id) ? " open" : ""}><summary>${plural(i.timeline.length, "step")}</summary>`
      + `<ol class="timeline">${i.timeline.map(step).join("")}</ol></details></td>`
      + `<td class="closeout-cell">${closeoutCell(i)}</td></tr>`);
    put(body, rows.join("") || '<tr><td colspan="7" class="empty">No calls yet</td></tr>');
  }

  // The calls that sound the alarm: live ones no desk answered and nobody acknowledged, and missed ones.
  function alarms(overview) {
    const live = list(overview.calls).map(object).filter((c) => c && c.alarm === true).map((c) => ({
      incident: str(c.incident), name: str(c.post_name), reference: str(c.reference),
      why: c.state === "overflowed" ? "overflowed: the caller is on the overflow route" : "ringing the desks" }));
    const missed = list(overview.missed).map(object).filter(Boolean).map((c) => ({
      incident: str(c.incident), name: str(c.post_name), reference: str(c.reference),
      why: "missed: the caller hung up before any desk answered" }));
    return [...live, ...missed];
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
        ui.serverNow(p.now);
        renderPbx(object(p.pbx) || {});
        document.getElementById("problems").innerHTML = strings(p.problems).map((x) => `<li>${esc(x)}</li>`).join("");
        renderCalls(p.calls);
        renderPosts(p.posts);
        renderIncidents(list(i.incidents).map(object).filter(Boolean).map((x) => ({ ...x, timeline: list(x.timeline) })));
        window.refugeConsole.set(alarms(p));
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
      // EventSource retries by itself, except after an HTTP error (a 401 once the session is over: then
      // to the login page): start again a little later.
      if (source.readyState === EventSource.CLOSED) {
        window.refuge?.checkSession();
        setTimeout(connect, RECONNECT_MS);
      }
    };
    for (const type of EVENTS) source.addEventListener(type, refresh);
    // A camera fault is best seen in its picture: fetch the one the probe just took.
    for (const type of ["camera.fault", "camera.ok"]) source.addEventListener(type, reloadThumbs);
  }
  document.addEventListener("refuge:closed", refresh);

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
  setInterval(refresh, PROBLEMS_REFRESH_MS);

  // Mock posts only: press the call button from here (for demos and tests), as the logged-in operator.
  const notice = (text) => { document.getElementById("press-notice").textContent = text; };
  document.addEventListener("click", async (e) => {
    const button = e.target.closest("button.press");
    if (!button || !window.refuge) return;
    const id = button.dataset.post;
    const reply = await ui.write(`/api/v1/posts/${encodeURIComponent(id)}/press`);
    if (reply.status === 403) notice("The sidecar refused the press: reload the page and try again.");
    else if (reply.status === 404 || reply.status === 405) notice("This sidecar cannot press a post's button.");
    else if (reply.status === 0) notice("Press failed: the sidecar did not answer.");
    else notice(reply.ok ? `Pressed the call button of ${post(id)}.` : `Press failed: HTTP ${reply.status}.`);
  });

  ui.localTimes(document);
  connect();
})();
