// The operator's session on every page: the CSRF token each write carries, and the way back to the login
// page once the session has ended (logout in another tab, expiry, a user removed, a restarted sidecar).
"use strict";

window.refuge = (() => {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";

  function toLogin() {
    location.assign(`/login?next=${encodeURIComponent(location.pathname + location.search)}`);
  }

  // After an HTTP error on the event stream: a 401 here means the session is over, anything else that the
  // sidecar is having trouble (the page says so and keeps trying).
  async function checkSession() {
    try {
      const reply = await fetch("/api/v1/session", { cache: "no-store" });
      if (reply.status === 401) {
        toLogin();
        return false;
      }
    } catch (err) {
      console.warn("the sidecar did not answer", err);
    }
    return true;
  }

  // A write (press, acknowledge, close-out) with the session's CSRF token; same-origin, so the cookie goes too.
  function post(url, init = {}) {
    return fetch(url, { ...init, method: "POST", headers: { ...(init.headers || {}), "X-CSRF-Token": csrf } });
  }

  return { csrf, toLogin, checkSession, post };
})();
