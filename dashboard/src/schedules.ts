// Schedules: list, create, pause or resume, delete; next runs shown in the
// schedule's own time zone (and the viewer's).

import { html } from "htm/preact";
import { useState } from "preact/hooks";
import type { Offload, Schedule, ScheduleBody } from "@offload/client";
import { usePolled } from "./hooks";
import { message } from "./session";

function inZone(iso: string, timeZone: string): string {
  try {
    return new Intl.DateTimeFormat(undefined, {
      year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", timeZone, timeZoneName: "short",
    }).format(new Date(iso));
  } catch {
    return iso;
  }
}

function bodyOf(s: Schedule, enabled: boolean): ScheduleBody {
  return {
    name: s.name, cron: s.cron, timezone: s.timezone, type: s.type, payload: s.payload,
    queue: s.queue, priority: s.priority, max_attempts: s.max_attempts, tags: s.tags, enabled,
  };
}

export function Schedules({ api }: { api: Offload }) {
  const { data, error, reload } = usePolled(() => api.schedules(), 10_000, [api]);
  const [formError, setFormError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const act = async (f: () => Promise<unknown>) => {
    setBusy(true);
    setFormError(null);
    try {
      await f();
      reload();
      return true;
    } catch (e) {
      setFormError(message(e));
      return false;
    } finally {
      setBusy(false);
    }
  };
  const create = async (e: Event) => {
    e.preventDefault();
    const formEl = e.target as HTMLFormElement;
    const form = new FormData(formEl);
    let payload: Record<string, unknown>;
    try {
      payload = JSON.parse(String(form.get("payload") || "{}"));
    } catch {
      setFormError("the payload is not valid JSON");
      return;
    }
    const body: ScheduleBody = {
      name: String(form.get("name")),
      cron: String(form.get("cron")),
      timezone: String(form.get("timezone") || "UTC"),
      type: String(form.get("type")),
      payload,
      tags: String(form.get("tags") || "").split(",").map((t) => t.trim()).filter(Boolean),
    };
    if (await act(() => api.createSchedule(body))) formEl.reset();
  };
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  return html`<h1>Schedules</h1>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <div class="table-wrap card">
      <table>
        <caption class="muted">${data ? `${data.length} schedule${data.length === 1 ? "" : "s"}` : "Loading…"}</caption>
        <thead><tr><th scope="col">Name</th><th scope="col">When</th><th scope="col">Type</th><th scope="col">Next runs</th><th scope="col">Last run</th><th scope="col"><span class="sr-only">Actions</span></th></tr></thead>
        <tbody>
          ${data?.map((s) => html`<tr data-schedule=${s.id}>
            <th scope="row">${s.name} ${!s.enabled && html`<span class="badge badge-cancelled">paused</span>`}</th>
            <td><code>${s.cron}</code> <span class="muted">${s.timezone}</span></td>
            <td>${s.type}</td>
            <td>${s.enabled
              ? html`${inZone(s.next_run_at, s.timezone)}<br /><span class="muted">${inZone(s.next_run_at, zone)}</span>
                  <details><summary>then</summary><ul class="plain">${s.upcoming.slice(1).map((t) => html`<li>${inZone(t, s.timezone)}</li>`)}</ul></details>`
              : "—"}</td>
            <td>${s.last_run_at ? inZone(s.last_run_at, s.timezone) : "never"}</td>
            <td><span class="actions">
              <button disabled=${busy} onClick=${() => act(() => api.updateSchedule(s.id, bodyOf(s, !s.enabled)))}>${s.enabled ? "Pause" : "Resume"}</button>
              <button disabled=${busy} class="danger" onClick=${() => confirm(`Delete the schedule “${s.name}”? Jobs it made are kept.`) && act(() => api.deleteSchedule(s.id))}
                aria-label=${`Delete schedule ${s.name}`}>Delete</button>
            </span></td>
          </tr>`)}
          ${data && !data.length && html`<tr><td colspan="6" class="muted">No schedules yet.</td></tr>`}
        </tbody>
      </table>
    </div>
    <form class="card schedule-form" onSubmit=${create} aria-label="New schedule">
      <h2>New schedule</h2>
      <label>Name<input name="name" required /></label>
      <label>Cron (minute hour day month weekday)<input name="cron" required placeholder="0 2 * * *" /></label>
      <label>Time zone<input name="timezone" defaultValue=${zone} /></label>
      <label>Job type<input name="type" required placeholder="noop" /></label>
      <label>Payload (JSON)<textarea name="payload" rows="3" defaultValue="{}"></textarea></label>
      <label>Tags (comma-separated)<input name="tags" /></label>
      ${formError && html`<p class="error" role="alert">${formError}</p>`}
      <button type="submit" disabled=${busy}>Create schedule</button>
    </form>`;
}
