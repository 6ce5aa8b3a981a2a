// Small helpers the pages share (demo.js, watch.js, dashboard.js); m1client.js is the client
// library and knows nothing of pages.

/** Show `text` in a message element (hidden when empty); `kind` is success, error or info. */
export function showMessage(element, text, kind = "") {
  element.textContent = text;
  element.className = "message " + kind;
  element.hidden = !text;
}

/** A small button that calls `onClick`. */
export function button(label, className, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = "button small " + className;
  element.textContent = label;
  element.addEventListener("click", onClick);
  return element;
}

export function formatBytes(bytes) {
  if (!(bytes >= 0)) return "?";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}
