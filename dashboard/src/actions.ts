// Retry and cancel buttons, shown only where the API would accept them.

import { html } from "htm/preact";
import { useState } from "preact/hooks";
import type { Job, Offload } from "@offload/client";
import { message } from "./session";

export function JobActions({ api, job, onDone }: { api: Offload; job: Job; onDone?: (j: Job) => void }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const act = (what: "retry" | "cancel") => async () => {
    setBusy(true);
    setError(null);
    try {
      const j = what === "retry" ? await api.retryJob(job.id) : await api.cancelJob(job.id);
      onDone?.(j);
    } catch (e) {
      setError(message(e));
    } finally {
      setBusy(false);
    }
  };
  const canCancel = ["pending", "queued", "running", "waiting"].includes(job.status);
  const canRetry = job.status === "dead" || job.status === "cancelled";
  return html`<span class="actions">
    ${canCancel && html`<button disabled=${busy} onClick=${act("cancel")} aria-label=${`Cancel job ${job.id}`}>Cancel</button>`}
    ${canRetry && html`<button disabled=${busy} onClick=${act("retry")} aria-label=${`Retry job ${job.id}`}>Retry</button>`}
    ${error && html`<span class="error" role="alert">${error}</span>`}
  </span>`;
}
