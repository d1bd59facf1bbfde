// Overview: depth, running, finished in the last hour, success rate,
// throughput, latency percentiles, a breakdown by type, the dead count.

import { html } from "htm/preact";
import type { Offload, Stats } from "@offload/client";
import { usePolled } from "./hooks";
import { ms } from "./format";

function Card({ label, value, href }: { label: string; value: string; href?: string }) {
  const body = html`<span class="card-value">${value}</span><span class="card-label">${label}</span>`;
  return href
    ? html`<a class="card stat" href=${href}>${body}</a>`
    : html`<div class="card stat">${body}</div>`;
}

/** Bars of completed and failed per minute over the last hour, and the depth line. */
function Chart({ stats }: { stats: Stats }) {
  const depth: [number, number][] = stats.depth.map((d) => [Date.parse(d.minute), d.waiting]);
  const W = 600, H = 160, now = Date.now(), start = now - 3600_000;
  const x = (t: number) => ((t - start) / 3600_000) * W;
  const peak = Math.max(1, ...stats.throughput.map((m) => m.completed + m.failed), ...depth.map((d) => d[1]));
  const y = (v: number) => H - (v / peak) * (H - 10);
  const bw = Math.max(W / 60 - 2, 2);
  const line = depth.filter(([t]) => t >= start).map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const total = stats.throughput.reduce((n, m) => n + m.completed + m.failed, 0);
  return html`<figure class="card chart">
    <svg viewBox=${`0 0 ${W} ${H}`} role="img"
      aria-label=${`${total} jobs finished in the last hour; ${depth.length ? depth[depth.length - 1]![1] : 0} waiting now`}>
      ${stats.throughput.map((m) => {
        const t = Date.parse(m.minute);
        return html`<g>
          <rect class="bar-ok" x=${x(t)} width=${bw} y=${y(m.completed)} height=${H - y(m.completed)}></rect>
          <rect class="bar-fail" x=${x(t)} width=${bw} y=${y(m.completed + m.failed)} height=${H - y(m.failed)}></rect>
        </g>`;
      })}
      ${line && html`<polyline class="depth" points=${line}></polyline>`}
    </svg>
    <figcaption>
      <span class="key key-ok">completed</span> <span class="key key-fail">failed</span> per minute, last hour;
      <span class="key key-depth">depth</span> (pending + queued, sampled each minute). Peak ${peak}.
    </figcaption>
  </figure>`;
}

export function Overview({ api }: { api: Offload }) {
  const { data: stats, error } = usePolled((signal) => api.stats(3600, { signal }), 3000, [api]);
  if (!stats) return html`<h1>Overview</h1>${error ? html`<p class="error" role="alert">${error}</p>` : html`<p aria-busy="true">Loading…</p>`}`;
  const s = stats.by_status;
  const depth = (s.pending ?? 0) + (s.queued ?? 0);
  const done = (s.completed ?? 0) + (s.dead ?? 0);
  const perMinute = stats.throughput.length
    ? stats.throughput.reduce((n, m) => n + m.completed + m.failed, 0) / 60
    : 0;
  const types = Object.entries(stats.by_type);
  return html`<h1>Overview</h1>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <section class="cards" aria-label="Now and the last hour">
      <${Card} label="Waiting (pending + queued)" value=${String(depth)} href="#/jobs?status=queued" />
      <${Card} label="Running" value=${String(s.running ?? 0)} href="#/jobs?status=running" />
      <${Card} label="Completed, last hour" value=${String(s.completed ?? 0)} href="#/jobs?status=completed" />
      <${Card} label="Failed, last hour" value=${String(s.dead ?? 0)} href="#/dead" />
      <${Card} label="Success rate" value=${done ? `${(100 * (1 - (stats.failure_rate ?? 0))).toFixed(1)} %` : "—"} />
      <${Card} label="Throughput" value=${`${perMinute.toFixed(1)}/min`} />
    </section>
    <${Chart} stats=${stats} />
    <div class="two">
      <section class="card">
        <h2>Latency, last hour</h2>
        <table>
          <thead><tr><th scope="col"></th><th scope="col">p50</th><th scope="col">p95</th><th scope="col">p99</th><th scope="col">jobs</th></tr></thead>
          <tbody>
            ${[["Wait (created → started)", stats.wait_ms], ["Run (started → finished)", stats.run_ms]].map(
              ([label, p]: any) => html`<tr><th scope="row">${label}</th><td class="num">${ms(p.p50)}</td><td class="num">${ms(p.p95)}</td><td class="num">${ms(p.p99)}</td><td class="num">${p.samples}</td></tr>`,
            )}
          </tbody>
        </table>
      </section>
      <section class="card">
        <h2>By job type, last hour</h2>
        ${types.length
          ? html`<table>
              <thead><tr><th scope="col">Type</th><th scope="col">Completed</th><th scope="col">Dead</th><th scope="col">Cancelled</th></tr></thead>
              <tbody>${types.map(([t, c]) => html`<tr><th scope="row"><a href=${`#/jobs?type=${encodeURIComponent(t)}`}>${t}</a></th><td>${c.completed}</td><td>${c.dead}</td><td>${c.cancelled}</td></tr>`)}</tbody>
            </table>`
          : html`<p class="muted">No job finished in the last hour.</p>`}
      </section>
    </div>
    <section class="card">
      <h2>Queues</h2>
      <table>
        <thead><tr><th scope="col">Queue</th><th scope="col">Pending</th><th scope="col">Queued</th><th scope="col">Running</th></tr></thead>
        <tbody>${Object.entries(stats.by_queue).map(([q, c]) => html`<tr><th scope="row">${q}</th><td>${c.pending}</td><td>${c.queued}</td><td>${c.running}</td></tr>`)}</tbody>
      </table>
    </section>`;
}
