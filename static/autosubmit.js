// Submits a form when a control marked `data-autosubmit` changes (no inline handlers: the
// Content-Security-Policy allows scripts from files only).
document.addEventListener("change", (event) => {
  const control = event.target.closest("[data-autosubmit]");
  if (control && control.form) control.form.submit();
});
