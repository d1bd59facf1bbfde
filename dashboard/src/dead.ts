// Dead jobs: the last error of each, filters by type and error text, retry
// one or many.

import { html } from "htm/preact";
import { useState } from "preact/hooks";
import type { Job, Offload } from "@offload/client";
import { usePolled } from "./hooks";
import { ago } from "./format";
import { message } from "./session";

export function DeadJobs({ api }: { api: Offload }) {
  const [type, setType] = useState("");
  const [text, setText] = useState("");
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const [note, setNote] = useState<string | null>(null);
  const { data, error, reload } = usePolled(
    async (signal) => {
      const jobs: Job[] = [];
      for await (const j of api.listJobs({ status: "dead", type: type || undefined, limit: 200 }, { signal })) {
        jobs.push(j);
        if (jobs.length >= 1000) break;
      }
      return jobs;
    },
    5000,
    [api, type],
  );
  const shown = (data ?? []).filter(
    (j) => !text || (j.error_message ?? "").toLowerCase().includes(text.toLowerCase()),
  );
  const toggle = (id: string) => {
    const next = new Set(selected);
    next.has(id) ? next.delete(id) : next.add(id);
    setSelected(next);
  };
  const retry = async (ids: string[]) => {
    let ok = 0;
    const failed: string[] = [];
    for (const id of ids) {
      try {
        await api.retryJob(id);
        ok += 1;
      } catch (e) {
        failed.push(message(e));
      }
    }
    setSelected(new Set());
    setNote(`${ok} job${ok === 1 ? "" : "s"} sent to run again${failed.length ? `; ${failed.length} refused: ${failed[0]}` : ""}`);
    reload();
  };
  return html`<h1>Dead jobs</h1>
    <form class="filters card" onSubmit=${(e: Event) => e.preventDefault()} aria-label="Filter dead jobs">
      <label>Type<input defaultValue=${type} onChange=${(e: any) => setType(e.target.value.trim())} /></label>
      <label>Error contains<input defaultValue=${text} onInput=${(e: any) => setText(e.target.value)} /></label>
      <button type="button" disabled=${!selected.size} onClick=${() => retry([...selected])}>Retry selected (${selected.size})</button>
    </form>
    ${note && html`<p class="notice" role="status">${note}</p>`}
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <div class="table-wrap card">
      <table>
        <caption class="muted">${data ? `${shown.length} dead job${shown.length === 1 ? "" : "s"} shown` : "Loading…"}</caption>
        <thead><tr>
          <th scope="col"><input type="checkbox" aria-label="Select all shown"
            checked=${shown.length > 0 && shown.every((j) => selected.has(j.id))}
            onChange=${(e: any) => setSelected(e.target.checked ? new Set(shown.map((j) => j.id)) : new Set())} /></th>
          <th scope="col">Type</th><th scope="col">Last error</th><th scope="col">Attempts</th><th scope="col">Died</th><th scope="col"><span class="sr-only">Actions</span></th>
        </tr></thead>
        <tbody>
          ${shown.map((j) => html`<tr data-job=${j.id}>
            <td><input type="checkbox" aria-label=${`Select job ${j.id}`} checked=${selected.has(j.id)} onChange=${() => toggle(j.id)} /></td>
            <td><a href=${`#/jobs/${j.id}`}>${j.type}</a></td>
            <td class="error-text">${j.error_message ?? "—"}</td>
            <td>${j.attempts}/${j.max_attempts}</td>
            <td title=${j.finished_at ?? ""}>${ago(j.finished_at)}</td>
            <td><button onClick=${() => retry([j.id])} aria-label=${`Retry job ${j.id}`}>Retry</button></td>
          </tr>`)}
          ${data && !shown.length && html`<tr><td colspan="6" class="muted">No dead jobs. Good.</td></tr>`}
        </tbody>
      </table>
    </div>`;
}
