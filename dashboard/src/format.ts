// Small formatting helpers shared by the screens.

import { html } from "htm/preact";
import type { Job } from "@offload/client";

export const ago = (iso: string | null | undefined): string => {
  if (!iso) return "—";
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.max(s, 0)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleString();
};

/** A time to come as "in 5 min" (or as `ago` once it has passed). */
export const fromNow = (iso: string): string => {
  const s = Math.round((Date.parse(iso) - Date.now()) / 1000);
  if (s <= 0) return ago(iso);
  if (s < 60) return `in ${s} s`;
  if (s < 3600) return `in ${Math.round(s / 60)} min`;
  if (s < 86400) return `in ${Math.round(s / 3600)} h`;
  return new Date(iso).toLocaleString();
};

export const ms = (v: number | null | undefined): string => {
  if (v == null) return "—";
  if (v < 1000) return `${Math.round(v)} ms`;
  if (v < 60_000) return `${(v / 1000).toFixed(1)} s`;
  return `${(v / 60_000).toFixed(1)} min`;
};

export function duration(job: Job): string {
  if (!job.started_at) return "—";
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  return ms(end - Date.parse(job.started_at));
}

export function badge(status: string) {
  return html`<span class=${`badge badge-${status}`}>${status}</span>`;
}

export function progressBar(job: Job, label = "Progress") {
  const p = job.progress;
  const pct = p.percentage ?? (job.status === "completed" ? 100 : null);
  return html`<span class="progress">
    <progress max="100" value=${pct ?? undefined} aria-label=${label}></progress>
    <span class="muted">${pct == null ? (p.processed ? `${p.processed}` : "") : `${Math.round(pct)} %`}</span>
  </span>`;
}

/** JSON as highlighted, readable text (spans with classes; no HTML is injected). */
export function jsonView(value: unknown) {
  const text = JSON.stringify(value, null, 2) ?? "null";
  const parts: unknown[] = [];
  const re = /("(?:\\.|[^"\\])*")(\s*:)?|\b(true|false|null)\b|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g;
  let last = 0;
  for (let m = re.exec(text); m; m = re.exec(text)) {
    parts.push(text.slice(last, m.index));
    if (m[1]) {
      parts.push(html`<span class=${m[2] ? "j-key" : "j-str"}>${m[1]}</span>`);
      if (m[2]) parts.push(m[2]);
    } else if (m[3]) parts.push(html`<span class="j-lit">${m[3]}</span>`);
    else parts.push(html`<span class="j-num">${m[4]}</span>`);
    last = re.lastIndex;
  }
  parts.push(text.slice(last));
  return html`<pre class="json">${parts}</pre>`;
}
