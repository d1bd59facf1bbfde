// Jobs: filters (status, type, tag, created between), cursor paging, live
// refresh, retry and cancel on each row. The filters live in the URL, so a
// filtered view can be linked to and survives a reload.

import { html } from "htm/preact";
import { useState } from "preact/hooks";
import type { JobFilter, JobStatus, Offload } from "@offload/client";
import { usePolled } from "./hooks";
import { ago, badge, duration, progressBar } from "./format";
import { JobActions } from "./actions";

const STATUSES: JobStatus[] = ["pending", "queued", "running", "waiting", "completed", "cancelled", "dead"];

function toRfc3339(local: string): string | undefined {
  return local ? new Date(local).toISOString() : undefined;
}

export function Jobs({ api, params }: { api: Offload; params: URLSearchParams }) {
  const filter: JobFilter = {
    status: (params.get("status") as JobStatus) || undefined,
    type: params.get("type") || undefined,
    tag: params.get("tag") || undefined,
    created_after: toRfc3339(params.get("from") ?? ""),
    created_before: toRfc3339(params.get("to") ?? ""),
    limit: 25,
  };
  const [cursors, setCursors] = useState<string[]>([]);
  const cursor = cursors[cursors.length - 1];
  const key = params.toString();
  const { data, error, reload } = usePolled(
    (signal) => api.listJobsPage({ ...filter, cursor }, { signal }),
    3000,
    [api, key, cursor],
  );
  const apply = (e: Event) => {
    e.preventDefault();
    const form = new FormData(e.target as HTMLFormElement);
    const next = new URLSearchParams();
    for (const [k, v] of form) if (String(v).trim()) next.set(k, String(v).trim());
    setCursors([]);
    location.hash = `#/jobs${next.size ? `?${next}` : ""}`;
  };
  return html`<h1>Jobs</h1>
    <form class="filters card" onSubmit=${apply} aria-label="Filter jobs" key=${key}>
      <label>Status
        <select name="status">
          <option value="">any</option>
          ${STATUSES.map((s) => html`<option value=${s} selected=${params.get("status") === s}>${s}</option>`)}
        </select>
      </label>
      <label>Type<input name="type" defaultValue=${params.get("type") ?? ""} placeholder="e.g. contact_import" /></label>
      <label>Tag<input name="tag" defaultValue=${params.get("tag") ?? ""} /></label>
      <label>Created from<input type="datetime-local" name="from" defaultValue=${params.get("from") ?? ""} /></label>
      <label>to<input type="datetime-local" name="to" defaultValue=${params.get("to") ?? ""} /></label>
      <button type="submit">Apply</button>
      <a href="#/jobs" class="button secondary" onClick=${() => setCursors([])}>Clear</a>
    </form>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <div class="table-wrap card">
      <table class="jobs">
        <caption class="muted">${data ? `${data.jobs.length} jobs on this page, newest first; refreshed every 3 s` : "Loading…"}</caption>
        <thead><tr>
          <th scope="col">Type</th><th scope="col">Status</th><th scope="col">Progress</th><th scope="col">Created</th>
          <th scope="col">Duration</th><th scope="col">Attempts</th><th scope="col">Tags</th><th scope="col"><span class="sr-only">Actions</span></th>
        </tr></thead>
        <tbody>
          ${data?.jobs.map(
            (j) => html`<tr data-job=${j.id}>
              <td><a href=${`#/jobs/${j.id}`}>${j.type}</a></td>
              <td>${badge(j.status)}</td>
              <td>${progressBar(j, `Progress of job ${j.id}`)}</td>
              <td title=${j.created_at}>${ago(j.created_at)}</td>
              <td>${duration(j)}</td>
              <td>${j.attempts}/${j.max_attempts}</td>
              <td>${j.tags.map((t) => html`<a class="tag" href=${`#/jobs?tag=${encodeURIComponent(t)}`}>${t}</a>`)}</td>
              <td><${JobActions} api=${api} job=${j} onDone=${reload} /></td>
            </tr>`,
          )}
          ${data && !data.jobs.length && html`<tr><td colspan="8" class="muted">No jobs match.</td></tr>`}
        </tbody>
      </table>
    </div>
    <nav class="pager" aria-label="Pages">
      <button disabled=${!cursors.length} onClick=${() => setCursors(cursors.slice(0, -1))}>Newer</button>
      <button disabled=${!data?.next_cursor} onClick=${() => data?.next_cursor && setCursors([...cursors, data.next_cursor])}>Older</button>
    </nav>`;
}
