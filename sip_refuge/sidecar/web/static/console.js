// The console's alarm, on the dashboard and the operator page alike. A call no desk has answered and nobody
// has acknowledged sounds a repeating tone, raises a browser notification, flashes the page title and shows a
// red bar with an Acknowledge button per call, until a desk answers or an operator acknowledges it.
//
// The page script says which calls alarm (set()); this file owns the sound, the bar, the title and the
// notifications. <body data-alarm="on|off"> and data-sound="on|off|blocked" say what it is doing.
// Browsers play sound only after a click on the page: "Start console" is that click, as on real consoles.
// A kiosk browser started with --autoplay-policy=no-user-gesture-required needs none.
"use strict";

window.refugeConsole = (() => {
  const { esc, str, write } = window.refugeUi;
  const body = document.body;
  const bar = document.getElementById("alarm");
  const startButton = document.getElementById("start-console");
  const state = document.getElementById("console-state");
  const TITLE = document.title;
  const PATTERN_S = 1.5; // one round of the alarm: three beeps, then a pause
  const BEEPS = [[0, 880], [0.25, 660], [0.5, 880]]; // [start s, Hz]: a two-tone, unlike any phone ring
  const BEEP_S = 0.18;
  const VOLUME = 0.4;

  let context = null; // the AudioContext, once the browser lets the page play sound
  let analyser = null;
  let pattern = null; // the alarm as an AudioBuffer, made here: nothing is fetched
  let source = null; // the looping tone while it sounds
  let desk = null; // the operator page's desk, sent with an acknowledgement
  let alarms = new Map(); // incident -> {incident, name, reference, why}
  const pending = new Set(); // acknowledged here, not yet confirmed by the sidecar's event
  const notices = new Map(); // incident -> Notification
  let flash = null;
  let message = "";

  function makePattern(ctx) {
    const rate = ctx.sampleRate;
    const buffer = ctx.createBuffer(1, Math.round(rate * PATTERN_S), rate);
    const data = buffer.getChannelData(0);
    const ramp = 0.005 * rate; // 5 ms fades: no clicks
    for (const [start, hz] of BEEPS) {
      const first = Math.round(start * rate);
      const count = Math.round(BEEP_S * rate);
      for (let i = 0; i < count; i += 1) {
        data[first + i] = VOLUME * Math.min(1, i / ramp, (count - i) / ramp) * Math.sin(2 * Math.PI * hz * i / rate);
      }
    }
    return buffer;
  }

  function ready(ctx) {
    context = ctx;
    analyser = ctx.createAnalyser();
    analyser.fftSize = 2048;
    analyser.connect(ctx.destination);
    // Silence, always playing: the analyser keeps measuring (zeros) between alarms instead of holding the
    // last samples of the tone.
    const quiet = ctx.createConstantSource();
    quiet.offset.value = 0;
    quiet.connect(analyser);
    quiet.start();
    pattern = makePattern(ctx);
    startButton.hidden = true;
    state.textContent = "Console started: alarm sound on";
    state.dataset.state = "started";
    sound();
  }

  // The click: the browser now lets this page play sound and ask for notifications.
  async function start() {
    try {
      const ctx = context || new AudioContext();
      await ctx.resume();
      if (!context) ready(ctx);
    } catch (err) {
      state.textContent = "This browser cannot play the alarm sound";
      console.warn("no alarm sound", err);
    }
    if ("Notification" in window && Notification.permission === "default") {
      try { await Notification.requestPermission(); } catch (err) { console.warn("no notifications", err); }
    }
    render();
  }

  // A kiosk browser may allow sound without a click: then the console starts by itself.
  function tryWithoutClick() {
    if (typeof AudioContext !== "function") return;
    const ctx = new AudioContext();
    if (ctx.state === "running") ready(ctx);
    else ctx.close();
  }

  function sounding() {
    return [...alarms.keys()].some((id) => !pending.has(id));
  }

  function sound() {
    const on = sounding();
    if (on && context && !source) {
      source = context.createBufferSource();
      source.buffer = pattern;
      source.loop = true;
      source.connect(analyser);
      source.start();
    } else if (!on && source) {
      source.stop();
      source.disconnect();
      source = null;
    }
    body.dataset.sound = source ? "on" : on ? "blocked" : "off";
  }

  function notify() {
    const allowed = "Notification" in window && Notification.permission === "granted";
    for (const [id, call] of alarms) {
      if (notices.has(id) || pending.has(id) || !allowed) continue;
      try {
        const note = new Notification(`Refuge call: ${call.name}`, { body: `${call.why}${call.reference
          ? ` (${call.reference})` : ""}`, tag: id, requireInteraction: true });
        note.onclick = () => { window.focus(); note.close(); };
        notices.set(id, note);
      } catch (err) {
        console.warn("notification refused", err);
        notices.set(id, null);
      }
    }
    for (const [id, note] of notices) {
      if (!alarms.has(id) || pending.has(id)) {
        note?.close();
        notices.delete(id);
      }
    }
  }

  function title() {
    const first = [...alarms.values()].find((c) => !pending.has(c.incident));
    if (first && !flash) {
      let bright = false;
      flash = setInterval(() => {
        const now = [...alarms.values()].find((c) => !pending.has(c.incident));
        bright = !bright;
        document.title = bright && now ? `⚠ CALL: ${now.name}` : TITLE;
      }, 1000);
      document.title = `⚠ CALL: ${first.name}`;
    } else if (!first && flash) {
      clearInterval(flash);
      flash = null;
      document.title = TITLE;
    }
  }

  function render() {
    const live = [...alarms.values()].filter((c) => !pending.has(c.incident));
    body.dataset.alarm = live.length ? "on" : "off";
    bar.hidden = !live.length && !message;
    const blocked = live.length && !source;
    const html = live.map((c) => `<li><span class="what"><strong>${esc(c.name)}</strong>`
      + `${c.reference ? ` <span class="ref">${esc(c.reference)}</span>` : ""}: ${esc(c.why)}</span>`
      + ` <button type="button" class="acknowledge" data-incident="${esc(c.incident)}">Acknowledge`
      + `<span class="visually-hidden"> the call from ${esc(c.name)}</span></button></li>`).join("");
    window.refugeUi.put(bar.querySelector(".alarm-calls"), html);
    bar.querySelector(".alarm-sound").textContent = blocked
      ? "The alarm sound is off in this browser: press Start console." : "";
    bar.querySelector(".alarm-message").textContent = message;
    startButton.classList.toggle("urgent", Boolean(blocked));
  }

  // The page's calls that alarm now: [{incident, name, reference, why}]. Called after every change.
  function set(calls) {
    alarms = new Map(calls.filter((c) => str(c.incident)).map((c) => [c.incident, c]));
    for (const id of pending) if (!alarms.has(id)) pending.delete(id);
    sound();
    notify();
    title();
    render();
  }

  async function acknowledge(incident) {
    pending.add(incident); // silence it here at once; every other console hears it from the sidecar
    message = "";
    set([...alarms.values()]);
    const body = desk ? { desk } : undefined;
    const reply = await write(`/api/v1/incidents/${encodeURIComponent(incident)}/acknowledge`, body);
    // 409: acknowledged or answered meanwhile, which silences it just the same.
    if (!reply.ok && reply.status !== 409) {
      pending.delete(incident);
      message = `Could not acknowledge: ${reply.text}`;
      set([...alarms.values()]);
    }
    return reply;
  }

  startButton.addEventListener("click", start);
  bar.addEventListener("click", (e) => {
    const button = e.target.closest("button.acknowledge[data-incident]");
    if (button) acknowledge(button.dataset.incident);
  });
  tryWithoutClick();
  render();

  return {
    set, acknowledge,
    forDesk: (id) => { desk = id; },
    // For tests and the curious: is the tone playing, and how loud is what the page sends to the speakers.
    sound: () => ({ context: context ? context.state : "none", playing: Boolean(source), level: level() }),
  };

  function level() {
    if (!analyser) return 0;
    const samples = new Float32Array(analyser.fftSize);
    analyser.getFloatTimeDomainData(samples);
    return Math.sqrt(samples.reduce((sum, v) => sum + v * v, 0) / samples.length);
  }
})();
