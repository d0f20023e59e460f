// Close-out (templates/_closeout.html): any button.close-incident[data-incident] opens the dialog; the
// operator picks a reason and may write a note; the sidecar records it once and tells every page
// (incident.closed), which then shows the incident as closed.
"use strict";

(() => {
  const { write } = window.refugeUi;
  const dialog = document.getElementById("closeout");
  const form = document.getElementById("closeout-form");
  const reason = document.getElementById("closeout-reason");
  const note = document.getElementById("closeout-note");
  const message = document.getElementById("closeout-message");
  const submit = document.getElementById("closeout-submit");
  let incident = null;
  let opener = null;

  document.addEventListener("click", (e) => {
    const button = e.target.closest("button.close-incident[data-incident]");
    if (!button) return;
    incident = button.dataset.incident;
    opener = button;
    document.getElementById("closeout-ref").textContent = button.dataset.reference || "";
    document.getElementById("closeout-what").textContent = button.dataset.what || "";
    form.reset();
    message.textContent = "";
    submit.disabled = false;
    dialog.showModal();
    reason.focus();
  });

  document.getElementById("closeout-cancel").addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => {
    // Back to where the operator was, or (the row is gone once closed) to the table.
    if (opener && opener.isConnected) opener.focus();
    incident = null;
  });

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!incident) return;
    if (!reason.value) {
      message.textContent = "Choose a reason.";
      reason.focus();
      return;
    }
    submit.disabled = true;
    const body = { reason: reason.value, ...(note.value.trim() ? { note: note.value } : {}) };
    const reply = await write(`/api/v1/incidents/${encodeURIComponent(incident)}/close`, body);
    submit.disabled = false;
    if (reply.ok) {
      dialog.close();
      document.dispatchEvent(new CustomEvent("refuge:closed"));
    } else {
      message.textContent = `Not closed: ${reply.text}`;
    }
  });
})();
