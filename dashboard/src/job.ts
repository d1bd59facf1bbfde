// One job, live: followed over the realtime WebSocket (long-polls where
// there is none), with progress, an estimate of the time left, its wait
// (approve or reject a token wait), who created it, payload and result, its
// stream as it is written, logs, a timeline of its attempts, a fan_out's
// children, retry and cancel, and the files it made.

import { html } from "htm/preact";
import { useEffect, useLayoutEffect, useRef, useState } from "preact/hooks";
import { isFinished, isNewer, type Job, type LogPage, type Offload, type StreamChunk, type SubscriptionStatus } from "@offload/client";
import { ago, badge, duration, fromNow, jsonView, ms, progressBar } from "./format";
import { JobActions } from "./actions";
import { usePolled } from "./hooks";
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

/** Who created the job: a member's subject or a key's name when the viewer may list them (admins), else the id. */
function useCreator(api: Offload, id: string | null | undefined): string | null {
  const [name, setName] = useState<string | null>(null);
  useEffect(() => {
    setName(null);
    if (!id) return;
    let live = true;
    (async () => {
      const member = (await api.listMembers()).find((m) => m.id === id);
      if (member) return member.subject;
      const key = (await api.listApiKeys()).find((k) => k.id === id);
      return key ? `API key “${key.name}”` : null;
    })().then((n) => live && setName(n), () => {});
    return () => {
      live = false;
    };
  }, [api, id]);
  return name;
}

const WAITS: Record<string, string> = {
  children: "for its children to finish",
  time: "until a set time",
  token: "for a person to complete its wait token",
};

function WaitCard({ api, job }: { api: Offload; job: Job }) {
  const [busy, setBusy] = useState(false);
  const [note, setNote] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const w = job.wait!;
  const decide = (approved: boolean) => async () => {
    setBusy(true);
    setError(null);
    try {
      await api.completeToken(w.token!, { approved });
      setNote(approved ? "Approved: the job runs again to finish." : "Rejected: the job runs again to finish.");
    } catch (e) {
      setError(message(e));
    } finally {
      setBusy(false);
    }
  };
  const name = job.type === "approval" ? (job.payload as { name?: unknown }).name : undefined;
  return html`<section class="card" aria-labelledby="wait-h">
    <h2 id="wait-h">Waiting ${WAITS[w.kind] ?? w.kind}</h2>
    ${w.until && html`<p>${w.kind === "token" ? "Times out " : "Until "}<time datetime=${w.until} title=${w.until}>${new Date(w.until).toLocaleString()}</time> (${fromNow(w.until)})</p>`}
    ${w.kind === "token" && w.token && html`
      ${typeof name === "string" && html`<p>Approve <strong>${name}</strong>?</p>`}
      <p class="actions">
        <button disabled=${busy || !!note} onClick=${decide(true)}>Approve</button>
        <button class="danger" disabled=${busy || !!note} onClick=${decide(false)}>Reject</button>
        <span class="muted">token <code>${w.token}</code></span>
      </p>`}
    ${note && html`<p class="notice" role="status">${note}</p>`}
    ${error && html`<p class="error" role="alert">${error}</p>`}
  </section>`;
}

const PAGE = 50;

function Children({ api, job }: { api: Offload; job: Job }) {
  const [cursors, setCursors] = useState<string[]>([]);
  const cursor = cursors[cursors.length - 1];
  // Read again when the parent changes, and every few seconds while it runs.
  const { data, error } = usePolled(
    (signal) => api.children(job.id, { cursor, limit: PAGE }, { signal }),
    isFinished(job) ? 60_000 : 3000,
    [api, job.id, job.updated_at, cursor],
  );
  return html`<section class="card" aria-labelledby="children-h">
    <h2 id="children-h">Children</h2>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <div class="table-wrap">
      <table class="children">
        <caption class="muted">${data ? `${data.jobs.length} on this page, in the order created` : "Loading…"}</caption>
        <thead><tr><th scope="col">#</th><th scope="col">Job</th><th scope="col">Status</th><th scope="col">Progress</th><th scope="col">Finished</th></tr></thead>
        <tbody>
          ${data?.jobs.map((c, i) => html`<tr data-job=${c.id}>
            <td class="muted">${cursors.length * PAGE + i + 1}</td>
            <td><a href=${`#/jobs/${c.id}`}>${c.type}</a> <span class="muted mono">…${c.id.slice(-8)}</span></td>
            <td>${badge(c.status)}</td>
            <td>${progressBar(c, `Progress of job ${c.id}`)}</td>
            <td title=${c.finished_at ?? ""}>${ago(c.finished_at)}</td>
          </tr>`)}
          ${data && !data.jobs.length && html`<tr><td colspan="5" class="muted">No children yet.</td></tr>`}
        </tbody>
      </table>
    </div>
    ${(cursors.length > 0 || data?.next_cursor) && html`<nav class="pager" aria-label="Pages of children">
      <button disabled=${!cursors.length} onClick=${() => setCursors(cursors.slice(0, -1))}>Previous</button>
      <button disabled=${!data?.next_cursor} onClick=${() => data?.next_cursor && setCursors([...cursors, data.next_cursor])}>Next</button>
    </nav>`}
  </section>`;
}

/** The job's output stream, each chunk as a line, kept scrolled to the end while it is there. */
function Stream({ chunks }: { chunks: StreamChunk[] }) {
  const list = useRef<HTMLOListElement>(null);
  const atEnd = useRef(true);
  useLayoutEffect(() => {
    if (list.current && atEnd.current) list.current.scrollTop = list.current.scrollHeight;
  }, [chunks]);
  const onScroll = (e: Event) => {
    const el = e.currentTarget as HTMLElement;
    atEnd.current = el.scrollHeight - el.scrollTop - el.clientHeight < 24;
  };
  return html`<section class="card" aria-labelledby="stream-h">
    <h2 id="stream-h">Stream <span class="muted">${chunks.length} chunk${chunks.length === 1 ? "" : "s"}</span></h2>
    <ol class="stream" ref=${list} onScroll=${onScroll} aria-label="Stream">
      ${chunks.map((c) => html`<li data-cursor=${c.cursor}>${typeof c.data === "string" ? c.data : JSON.stringify(c.data)}</li>`)}
    </ol>
  </section>`;
}

const LIVE: Record<SubscriptionStatus, string> = {
  connecting: "connecting…",
  open: "live",
  polling: "live (long-polls)",
  closed: "",
};

export function JobDetail({ api, id }: { api: Offload; id: string }) {
  const [job, setJob] = useState<Job | null>(null);
  const [logs, setLogs] = useState<LogLine[]>([]);
  const [chunks, setChunks] = useState<StreamChunk[]>([]);
  const [error, setError] = useState<string | null>(null);
  const [live, setLive] = useState<SubscriptionStatus>("connecting");
  const creator = useCreator(api, job?.created_by);
  // A state newer than the one shown replaces it, whether it came live or from an action.
  const show = (next: Job) => setJob((shown) => (shown && shown.id === next.id && !isNewer(next, shown) ? shown : next));

  useEffect(() => {
    setJob(null);
    setLogs([]);
    setChunks([]);
    setError(null);
    let alive = true;
    const readLogs = async () => {
      const all: LogLine[] = [];
      let cursor: string | undefined;
      do {
        const page = await api.logs(id, { cursor, limit: 500 });
        all.push(...page.logs);
        cursor = page.next_cursor ?? undefined;
      } while (cursor && all.length < 5000);
      if (alive) setLogs(all);
    };
    const sub = api.subscribe(
      [id],
      (j) => {
        show(j);
        setError(null);
        readLogs().catch(() => {});
      },
      {
        stream: true,
        streamFrom: "start",
        onChunk: (c) => setChunks((cs) => (cs.length >= 5000 ? [...cs.slice(-4999), c] : [...cs, c])),
        onError: setError,
        onStatus: setLive,
      },
    );
    return () => {
      alive = false;
      sub.close();
    };
  }, [api, id]);

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
      <p>${badge(job.status)} <span class="muted">attempt ${job.attempts} of ${job.max_attempts} · queue ${job.queue} · created ${ago(job.created_at)} · ran ${duration(job)}</span>
        ${LIVE[live] && html` <span class=${`live live-${live}`} title="How this page follows the job">${LIVE[live]}</span>`}</p>
      <div class="big-progress">${progressBar(job, "Job progress")}</div>
      <p class="progress-text" aria-live="polite">
        ${p.total != null ? `${p.processed} of ${p.total} processed` : `${p.processed} processed`}${p.failed ? `, ${p.failed} failed` : ""}
        ${p.stage && html` · <strong>${p.stage}</strong>`} ${p.message && html` · ${p.message}`} ${left && html` · ${left}`}
      </p>
      ${job.error_message && html`<p class="error">${job.error_kind ?? "error"}: ${job.error_message}</p>`}
      <p class="muted created-by">Created by ${job.created_by
        ? html`<span class=${creator ? "" : "mono"} title=${job.created_by}>${creator ?? job.created_by}</span>`
        : "the system"}${job.parent_id && html` · child of <a class="mono" href=${`#/jobs/${job.parent_id}`}>${job.parent_id}</a>`}</p>
      <${JobActions} api=${api} job=${job} onDone=${show} />
      ${job.tags.length > 0 && html`<p>${job.tags.map((t) => html`<a class="tag" href=${`#/jobs?tag=${encodeURIComponent(t)}`}>${t}</a>`)}</p>`}
    </section>
    ${job.status === "waiting" && job.wait && html`<${WaitCard} api=${api} job=${job} key=${job.wait.token ?? job.wait.kind} />`}
    ${(job.type === "fan_out" || job.wait?.kind === "children") && html`<${Children} api=${api} job=${job} />`}
    ${chunks.length > 0 && html`<${Stream} chunks=${chunks} />`}
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
