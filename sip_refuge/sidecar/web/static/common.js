// What every page script shares: reading the JSON API defensively, words and times as the pages show them.
// The JSON API is the sidecar's, but parts of it started as a post's report: these read each value as the
// type expected, so no answer can stop a page from showing the others.
"use strict";

window.refugeUi = (() => {
  const names = JSON.parse(document.getElementById("site-data").textContent);
  const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  const list = (v) => (Array.isArray(v) ? v : []);
  const object = (v) => (v !== null && typeof v === "object" && !Array.isArray(v) ? v : null);
  const str = (v) => (typeof v === "string" ? v : "");
  const strings = (v) => list(v).filter((f) => typeof f === "string" && f);
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  const desk = (id) => (Object.hasOwn(names.desks, id) ? names.desks[id] : str(id));
  const post = (id) => (Object.hasOwn(names.posts, id) ? names.posts[id] : str(id));
  const reason = (id) => (Object.hasOwn(names.reasons, id) ? names.reasons[id] : str(id));

  // The sidecar's clock minus this browser's, from the last answer that said what time it was: waiting
  // times count on from the server's time, whatever this machine's clock says.
  let skew = 0;
  function serverNow(iso) {
    const at = Date.parse(str(iso));
    if (Number.isFinite(at)) skew = at - Date.now();
  }
  const now = () => Date.now() + skew;

  // "0:07", "12:30", "1:02:03"
  function duration(seconds) {
    const s = Math.max(0, Math.floor(Number.isFinite(seconds) ? seconds : 0));
    const [h, m, r] = [Math.floor(s / 3600), Math.floor((s % 3600) / 60), s % 60];
    const two = (n) => String(n).padStart(2, "0");
    return h ? `${h}:${two(m)}:${two(r)}` : `${m}:${two(r)}`;
  }
  const since = (iso) => (now() - Date.parse(iso)) / 1000;

  // Times come as UTC; the control room reads local time, with the date only when it is not today.
  function clock(iso) {
    const d = new Date(str(iso));
    if (Number.isNaN(d.getTime())) return "—";
    const time = d.toLocaleTimeString([], { hour12: false });
    return d.toDateString() === new Date().toDateString() ? time
      : `${d.toLocaleDateString([], { day: "numeric", month: "short" })} ${time}`;
  }
  const when = (iso) => (str(iso) ? `<time datetime="${esc(iso)}">${esc(clock(iso))}</time>` : "—");
  function localTimes(root) {
    for (const t of root.querySelectorAll("time[datetime]")) t.textContent = clock(t.dateTime);
  }

  // Counting clocks: every element with data-since (ISO UTC) shows the time since then, once a second.
  function tick() {
    for (const el of document.querySelectorAll("[data-since]")) {
      if (Number.isFinite(Date.parse(el.dataset.since))) el.textContent = duration(since(el.dataset.since));
    }
  }
  setInterval(tick, 1000);

  async function getJson(url) {
    const reply = await fetch(url, { cache: "no-store" });
    if (reply.status === 401) window.refuge?.toLogin(); // the session is over: log in again
    if (!reply.ok) throw new Error(`${url}: HTTP ${reply.status}`);
    return reply.json();
  }

  // A write as the logged-in operator (session.js adds the CSRF token): the reply's words for the page.
  async function write(url, body) {
    if (!window.refuge) return { ok: false, text: "Log in to do this." };
    try {
      const init = body === undefined ? {}
        : { body: JSON.stringify(body), headers: { "Content-Type": "application/json" } };
      const reply = await window.refuge.post(url, init);
      if (reply.status === 401) window.refuge.toLogin();
      let detail = "";
      try { detail = str(object(await reply.json())?.detail); } catch (err) { detail = ""; }
      return { ok: reply.ok, status: reply.status, text: detail || `HTTP ${reply.status}` };
    } catch (err) {
      return { ok: false, status: 0, text: "the sidecar did not answer" };
    }
  }

  const badge = (kind, label) => `<span class="badge ${kind}">${esc(label)}</span>`;

  // An incident's close-out: who closed it, why and when, or the button that opens the close-out dialog.
  function closeoutCell(i) {
    if (i.closed_at) {
      return `<span class="closed">${badge("ok", reason(i.close_reason))} by ${esc(i.closed_by || "?")}, `
        + `${when(i.closed_at)}</span>${i.close_note ? `<p class="note">${esc(i.close_note)}</p>` : ""}`;
    }
    if (i.state === "ended") {
      return `<button type="button" class="close-incident" data-incident="${esc(i.id)}" `
        + `data-reference="${esc(i.reference || "")}" data-what="${esc(post(i.post_id))}">Close…</button>`;
    }
    return '<span class="muted">once the call is over</span>';
  }

  // Writes only real changes: re-writing a live region would make a screen reader announce it again. A button
  // the keyboard was on gets the focus back in the new markup (the same kind of button for the same incident).
  function put(el, html) {
    if (!el || el.dataset.html === html) return;
    const focused = el.contains(document.activeElement) ? document.activeElement : null;
    const again = focused?.dataset.incident
      ? `${focused.localName}.${focused.classList[0]}[data-incident="${CSS.escape(focused.dataset.incident)}"]` : null;
    el.innerHTML = html;
    el.dataset.html = html;
    localTimes(el);
    tick();
    if (again) el.querySelector(again)?.focus();
  }

  return { names, esc, list, object, str, strings, plural, desk, post, reason, serverNow, now, duration, since,
    clock, when, localTimes, tick, getJson, write, put, badge, closeoutCell };
})();
