// Live updates for the dashboard (SPEC 14): server-sent events, no inline script (CSP
// default-src 'self'). Text goes in with textContent only: nothing from the bus becomes HTML.
"use strict";

function followCounters(box) {
  const line = document.getElementById("chart-line");
  // the hour so far, as the page drew it; the stream's samples extend it
  const rates = line && line.dataset.rates ? line.dataset.rates.split(" ").map(Number) : [];
  let last = null;
  const source = new EventSource(box.dataset.stream);
  source.addEventListener("counters", (event) => {
    const figures = JSON.parse(event.data);
    document.querySelectorAll("[data-key]").forEach((el) => {
      if (el.dataset.key in figures) el.textContent = String(figures[el.dataset.key]);
    });
    const now = Date.now() / 1000;
    if (last !== null && now > last.t) rates.push(Math.max(0, (figures.acked - last.acked) / (now - last.t)));
    last = { t: now, acked: figures.acked };
    if (line && rates.length > 1) {
      const shown = rates.slice(-3600);
      const top = Math.max(1, ...shown);
      const step = 600 / (shown.length - 1);
      line.setAttribute("points", shown.map((r, i) =>
        `${(i * step).toFixed(1)},${(80 - (r / top) * 80).toFixed(1)}`).join(" "));
    }
  });
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function followTail(body) {
  const source = new EventSource(body.dataset.stream);
  source.addEventListener("message", (event) => {
    const m = JSON.parse(event.data);
    const row = document.createElement("tr");
    const id = document.createElement("td");
    const link = document.createElement("a");
    link.href = "/messages/" + encodeURIComponent(m.id);
    link.textContent = m.id;
    id.appendChild(link);
    row.append(cell(m.sent_at), id, cell(m.from), cell(m.to.join(", ")), cell(m.type), cell(m.payload));
    body.prepend(row);
    while (body.rows.length > 500) body.deleteRow(-1);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const counters = document.getElementById("counters");
  if (counters) followCounters(counters);
  const tail = document.getElementById("tail");
  if (tail) followTail(tail);
});
