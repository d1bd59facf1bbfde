// The Offload client: the generated, typed routes of `/api/openapi.json`
// (`api`) and the calls a web app makes most, with errors as `OffloadError`.

import createClient, { type Client } from "openapi-fetch";
import type { components, paths } from "./schema.js";

export type { components, paths };
type Schemas = components["schemas"];
export type Job = Schemas["Job"];
export type JobStatus = Schemas["JobStatus"];
export type CreateJob = Schemas["CreateJob"];
export type JobList = Schemas["JobList"];
export type LogPage = Schemas["LogPage"];
export type Stats = Schemas["Stats"];
export type Schedule = Schemas["Schedule"];
export type ScheduleBody = Schemas["ScheduleBody"];
export type Problem = Schemas["Problem"];

/** Statuses a job never leaves (unless someone retries it). */
export const FINISHED: readonly JobStatus[] = ["completed", "cancelled", "dead"];

export function isFinished(job: Pick<Job, "status">): boolean {
  return FINISHED.includes(job.status);
}

/** An answer of the API that is not a success: its problem body, and the HTTP status. */
export class OffloadError extends Error {
  readonly status: number;
  readonly problem: Problem | undefined;
  constructor(status: number, problem: Problem | undefined, fallback?: string) {
    super(problem?.detail ?? fallback ?? `the API answered ${status}`);
    this.name = "OffloadError";
    this.status = status;
    this.problem = problem;
  }
  /** The offending field (`payload.ms`, `limit`), when the API named one. */
  get field(): string | undefined {
    return this.problem?.field ?? undefined;
  }
}

export interface OffloadOptions {
  /** Where the API is, e.g. `https://jobs.example.com` or `""` for the same origin. */
  baseUrl: string;
  /** The workspace every call is made in. */
  workspace: string;
  /** A JWT or an API key (`ofk_…`), or a function that returns one for each request. */
  token: string | (() => string | Promise<string>);
  /** A `fetch` to use instead of the global one (it is given a `Request`). */
  fetch?: (request: Request) => Promise<Response>;
}

export interface JobFilter {
  status?: JobStatus;
  type?: string;
  tag?: string;
  /** RFC 3339, inclusive. */
  created_after?: string;
  /** RFC 3339, exclusive. */
  created_before?: string;
  /** Jobs per page, 1 to 200. */
  limit?: number;
}

export interface WatchOptions {
  signal?: AbortSignal;
  /** Seconds each long-poll waits for a change (1 to 25, default 25). */
  waitSeconds?: number;
  /** Resume from an ETag an earlier watch saw: no update is repeated. */
  etag?: string;
  /** Called when a poll fails for a reason worth retrying (network, 429, 5xx). */
  onRetry?: (error: unknown, attempt: number) => void;
}

export interface WatchUpdate {
  job: Job;
  /** Pass it back as `WatchOptions.etag` to resume after this update. */
  etag: string | undefined;
}

const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener("abort", stop);
      resolve();
    }, ms);
    const stop = () => {
      clearTimeout(t);
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", stop, { once: true });
  });

/** Whether a failed poll is worth another try: the network, 429, or a 5xx. */
function retryable(e: unknown): boolean {
  if (e instanceof OffloadError) return e.status === 429 || e.status >= 500;
  return !(e instanceof DOMException && e.name === "AbortError");
}

async function problemOf(response: Response, error: unknown): Promise<OffloadError> {
  const problem =
    error && typeof error === "object" && "detail" in error ? (error as Problem) : undefined;
  return new OffloadError(response.status, problem, response.statusText || undefined);
}

export class Offload {
  /** Every route of the OpenAPI document, typed: `api.GET("/api/workspaces/{ws}/stats", …)`. */
  readonly api: Client<paths>;
  readonly workspace: string;

  constructor(options: OffloadOptions) {
    this.workspace = options.workspace;
    const { token } = options;
    this.api = createClient<paths>({
      baseUrl: options.baseUrl.replace(/\/$/, ""),
      fetch: options.fetch ?? ((req: Request) => globalThis.fetch(req)),
    });
    this.api.use({
      async onRequest({ request }) {
        const t = typeof token === "function" ? await token() : token;
        request.headers.set("Authorization", `Bearer ${t}`);
        return request;
      },
    });
  }

  private get ws() {
    return { ws: this.workspace };
  }

  private async ok<T>(
    call: Promise<{ data?: T; error?: unknown; response: Response }>,
  ): Promise<T> {
    const { data, error, response } = await call;
    if (!response.ok || data === undefined) throw await problemOf(response, error);
    return data;
  }

  /** Creates one job; the same `idempotencyKey` and body give the same job again. */
  createJob(
    job: CreateJob,
    options: { idempotencyKey?: string; signal?: AbortSignal } = {},
  ): Promise<Job> {
    return this.ok(
      this.api.POST("/api/workspaces/{ws}/jobs", {
        params: {
          path: this.ws,
          header: options.idempotencyKey ? { "Idempotency-Key": options.idempotencyKey } : {},
        },
        body: job,
        signal: options.signal,
      }),
    );
  }

  /** Creates up to 1 000 jobs at once, all or none, in the order given. */
  async createJobs(jobs: CreateJob[], options: { signal?: AbortSignal } = {}): Promise<Job[]> {
    const batch = await this.ok(
      this.api.POST("/api/workspaces/{ws}/jobs/batch", {
        params: { path: this.ws },
        body: { jobs },
        signal: options.signal,
      }),
    );
    return batch.jobs;
  }

  getJob(id: string, options: { signal?: AbortSignal } = {}): Promise<Job> {
    return this.ok(
      this.api.GET("/api/workspaces/{ws}/jobs/{id}", {
        params: { path: { ...this.ws, id } },
        signal: options.signal,
      }),
    );
  }

  /**
   * Follows a job until it finishes: `onUpdate` gets the job as it is now
   * (unless resuming from `etag`), then every change (progress, status) as
   * it happens, by long-polls that answer the moment the job
   * changes. A dropped connection or an unavailable API is retried with
   * backoff from the last ETag seen, so no change is missed or repeated.
   * Resolves with the finished job; rejects when `signal` aborts, or on an
   * answer no retry can mend (401, 404).
   */
  async watchJob(
    id: string,
    onUpdate: (update: WatchUpdate) => void,
    options: WatchOptions = {},
  ): Promise<Job> {
    const { signal } = options;
    const wait = Math.min(Math.max(options.waitSeconds ?? 25, 1), 25);
    let etag = options.etag;
    let failures = 0;
    for (;;) {
      signal?.throwIfAborted();
      try {
        // Without an ETag, the job as it is now first (a long-poll would
        // wait for its next change); then long-polls from what was seen.
        const { data, error, response } = await this.api.GET("/api/workspaces/{ws}/jobs/{id}", {
          params: {
            path: { ...this.ws, id },
            query: etag ? { wait } : {},
            header: etag ? { "If-None-Match": etag } : {},
          },
          signal,
        });
        failures = 0;
        if (response.status === 304) continue;
        if (!response.ok || data === undefined) throw await problemOf(response, error);
        etag = response.headers.get("ETag") ?? undefined;
        onUpdate({ job: data, etag });
        if (isFinished(data)) return data;
      } catch (e) {
        if (signal?.aborted) throw signal.reason;
        if (!retryable(e)) throw e;
        failures += 1;
        options.onRetry?.(e, failures);
        await sleep(Math.min(500 * 2 ** (failures - 1), 10_000), signal);
      }
    }
  }

  /** Cancels a job: at once if it had not started, at its next step if it runs. */
  cancelJob(id: string): Promise<Job> {
    return this.ok(
      this.api.POST("/api/workspaces/{ws}/jobs/{id}/cancel", {
        params: { path: { ...this.ws, id } },
      }),
    );
  }

  /** Runs a dead or cancelled job again from scratch. */
  retryJob(id: string): Promise<Job> {
    return this.ok(
      this.api.POST("/api/workspaces/{ws}/jobs/{id}/retry", {
        params: { path: { ...this.ws, id } },
      }),
    );
  }

  /** One page of jobs, newest first; pass `next_cursor` back as `cursor` for the next. */
  listJobsPage(
    filter: JobFilter & { cursor?: string } = {},
    options: { signal?: AbortSignal } = {},
  ): Promise<JobList> {
    return this.ok(
      this.api.GET("/api/workspaces/{ws}/jobs", {
        params: { path: this.ws, query: filter },
        signal: options.signal,
      }),
    );
  }

  /** Every job that matches, newest first, a page at a time as the loop asks. */
  async *listJobs(filter: JobFilter = {}, options: { signal?: AbortSignal } = {}) {
    let cursor: string | undefined;
    do {
      const page = await this.listJobsPage({ ...filter, cursor }, options);
      yield* page.jobs;
      cursor = page.next_cursor ?? undefined;
    } while (cursor);
  }

  /** A job's log lines, oldest first. */
  logs(id: string, query: { cursor?: string; limit?: number } = {}): Promise<LogPage> {
    return this.ok(
      this.api.GET("/api/workspaces/{ws}/jobs/{id}/logs", {
        params: { path: { ...this.ws, id }, query },
      }),
    );
  }

  /** Counts, throughput and latencies over the last `window` seconds (60 to 86 400). */
  stats(window?: number, options: { signal?: AbortSignal } = {}): Promise<Stats> {
    return this.ok(
      this.api.GET("/api/workspaces/{ws}/stats", {
        params: { path: this.ws, query: window ? { window } : {} },
        signal: options.signal,
      }),
    );
  }

  async schedules(): Promise<Schedule[]> {
    const list = await this.ok(
      this.api.GET("/api/workspaces/{ws}/schedules", { params: { path: this.ws } }),
    );
    return list.schedules;
  }

  createSchedule(body: ScheduleBody): Promise<Schedule> {
    return this.ok(
      this.api.POST("/api/workspaces/{ws}/schedules", { params: { path: this.ws }, body }),
    );
  }

  updateSchedule(id: string, body: ScheduleBody): Promise<Schedule> {
    return this.ok(
      this.api.PUT("/api/workspaces/{ws}/schedules/{id}", {
        params: { path: { ...this.ws, id } },
        body,
      }),
    );
  }

  async deleteSchedule(id: string): Promise<void> {
    const { error, response } = await this.api.DELETE("/api/workspaces/{ws}/schedules/{id}", {
      params: { path: { ...this.ws, id } },
    });
    if (!response.ok) throw await problemOf(response, error);
  }

  /**
   * The bytes of a file a job made (its result's `files`). The route checks
   * the workspace, then serves the file or redirects to a short-lived link.
   */
  async downloadFile(id: string, name: string): Promise<Blob> {
    const { data, error, response } = await this.api.GET(
      "/api/workspaces/{ws}/jobs/{id}/files/{name}",
      { params: { path: { ...this.ws, id, name } }, parseAs: "blob" },
    );
    if (!response.ok || data === undefined) throw await problemOf(response, error);
    return data;
  }
}

/** `new Offload(options)`. */
export function createOffload(options: OffloadOptions): Offload {
  return new Offload(options);
}
