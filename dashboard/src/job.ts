// One job, live: its long-poll answers the moment it changes (no refresh),
// with progress, an estimate of the time left, payload and result, logs, a
// timeline of its attempts, retry and cancel, and the files it made.

import { html } from "htm/preact";
import { useEffect, useState } from "preact/hooks";
import type { Job, LogPage, Offload } from "@offload/client";
import { ago, badge, duration, jsonView, ms, progressBar } from "./format";
import { JobActions } from "./actions";
import { message } from "./session";

type LogLine = LogPage["logs"][number];

function eta(job: Job): string | null {
  const p = job.progress;
  if (job.status !== "running" || !job.started_at || !p.total || !p.processed) return null;
  const done = p.processed + p.failed;
  const elapsed = Date.now() - Date.parse(job.started_at);
  const left = ((p.total - done) * elapsed) / done;
  return left > 0 ? `about ${ms(left)} left` : null;
}

function Timeline({ job, logs }: { job: Job; logs: LogLine[] }) {
  const events: [string, string, string][] = [["created", job.created_at, "Created"]];
  const attempts = new Map<number, LogLine[]>();
  for (const l of logs) attempts.set(l.attempt, [...(attempts.get(l.attempt) ?? []), l]);
  for (const [n, lines] of [...attempts].sort((a, b) => a[0] - b[0])) {
    if (n === 0) continue;
    events.push(["started", lines[0]!.created_at, `Attempt ${n} started`]);
    for (const l of lines.filter((l) => l.level === "error" || l.level === "warn")) {
      events.push([l.level === "error" ? "failed" : "warned", l.created_at, `Attempt ${n}: ${l.message}`]);
    }
  }
  if (job.started_at && !attempts.size) events.push(["started", job.started_at, "Started"]);
  if (job.status === "queued" && job.attempts > 0) events.push(["retry", job.run_at, `Retry after ${new Date(job.run_at).toLocaleTimeString()}`]);
  if (job.finished_at) {
    const what = job.status === "completed" ? "Completed" : job.status === "dead" ? `Dead: ${job.error_message ?? ""}` : "Cancelled";
    events.push([job.status, job.finished_at, what]);
  }
  events.sort((a, b) => Date.parse(a[1]) - Date.parse(b[1]));
  return html`<ol class="timeline">
    ${events.map(([kind, at, text]) => html`<li class=${`t-${kind}`}><time datetime=${at} title=${at}>${new Date(at).toLocaleTimeString()}</time> ${text}</li>`)}
  </ol>`;
}

export function JobDetail({ api, id }: { api: Offload; id: string }) {
  const [job, setJob] = useState<Job | null>(null);
  const [logs, setLogs] = useState<LogLine[]>([]);
  const [error, setError] = useState<string | null>(null);
  const [generation, setGeneration] = useState(0);

  useEffect(() => {
    const abort = new AbortController();
    const readLogs = async () => {
      const all: LogLine[] = [];
      let cursor: string | undefined;
      do {
        const page = await api.logs(id, { cursor, limit: 500 });
        all.push(...page.logs);
        cursor = page.next_cursor ?? undefined;
      } while (cursor && all.length < 5000);
      if (!abort.signal.aborted) setLogs(all);
    };
    (async () => {
      try {
        await api.watchJob(
          id,
          ({ job }) => {
            setJob(job);
            readLogs().catch(() => {});
          },
          { signal: abort.signal },
        );
      } catch (e) {
        if (!abort.signal.aborted) setError(message(e));
      }
    })();
    return () => abort.abort();
  }, [api, id, generation]);

  if (!job) return html`<h1>Job</h1>${error ? html`<p class="error" role="alert">${error}</p>` : html`<p aria-busy="true">Loading…</p>`}`;
  const p = job.progress;
  const files: string[] = Array.isArray((job.result as any)?.files) ? (job.result as any).files : [];
  const download = async (name: string) => {
    try {
      const blob = await api.downloadFile(job.id, name);
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = name;
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
    } catch (e) {
      setError(message(e));
    }
  };
  const left = eta(job);
  return html`<h1>${job.type} <span class="muted mono">${job.id}</span></h1>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <section class="card job-head">
      <p>${badge(job.status)} <span class="muted">attempt ${job.attempts} of ${job.max_attempts} · queue ${job.queue} · created ${ago(job.created_at)} · ran ${duration(job)}</span></p>
      <div class="big-progress">${progressBar(job, "Job progress")}</div>
      <p class="progress-text" aria-live="polite">
        ${p.total != null ? `${p.processed} of ${p.total} processed` : `${p.processed} processed`}${p.failed ? `, ${p.failed} failed` : ""}
        ${p.stage && html` · <strong>${p.stage}</strong>`} ${p.message && html` · ${p.message}`} ${left && html` · ${left}`}
      </p>
      ${job.error_message && html`<p class="error">${job.error_kind ?? "error"}: ${job.error_message}</p>`}
      <${JobActions} api=${api} job=${job} onDone=${(j: Job) => { setJob(j); setGeneration((g) => g + 1); }} />
      ${job.tags.length > 0 && html`<p>${job.tags.map((t) => html`<a class="tag" href=${`#/jobs?tag=${encodeURIComponent(t)}`}>${t}</a>`)}</p>`}
    </section>
    ${files.length > 0 && html`<section class="card"><h2>Files</h2><ul>
      ${files.map((f) => html`<li><button class="link" onClick=${() => download(f)}>Download ${f}</button></li>`)}
    </ul></section>`}
    <div class="two">
      <section class="card"><h2>Payload</h2>${jsonView(job.payload)}</section>
      <section class="card"><h2>Result</h2>${job.result == null ? html`<p class="muted">None yet.</p>` : jsonView(job.result)}</section>
    </div>
    <div class="two">
      <section class="card"><h2>Timeline</h2><${Timeline} job=${job} logs=${logs} /></section>
      <section class="card"><h2>Logs</h2>
        ${logs.length
          ? html`<ol class="logs">${logs.map((l) => html`<li class=${`log-${l.level}`}>
              <time datetime=${l.created_at}>${new Date(l.created_at).toLocaleTimeString()}</time>
              <span class="level">${l.level}</span> <span class="muted">#${l.attempt}</span> ${l.message}</li>`)}</ol>`
          : html`<p class="muted">No log lines.</p>`}
      </section>
    </div>`;
}
