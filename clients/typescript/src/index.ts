// The Offload client: the generated, typed routes of `/api/openapi.json`
// (`api`) and the calls a web app makes most, with errors as `OffloadError`.

import createClient, { type Client } from "openapi-fetch";
import type { components, paths } from "./schema.js";
import { Follower, later, type Host } from "./realtime.js";

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
export type Wait = Schemas["Wait"];
export type WaitKind = Schemas["WaitKind"];
export type CreateBrowserToken = Schemas["CreateBrowserToken"];
export type BrowserToken = Schemas["BrowserToken"];
export type Scope = Schemas["Scope"];
export type CompletedToken = Schemas["CompletedToken"];
export type Member = Schemas["MemberRecord"];
export type PutMember = Schemas["PutMember"];
export type ApiKey = Schemas["ApiKeyView"];
export type CreateApiKey = Schemas["CreateApiKey"];
export type Workspace = Schemas["WorkspaceRecord"];
export type WorkspaceList = Schemas["WorkspaceList"];
export type CreateWorkspace = Schemas["CreateWorkspace"];
export type UpdateWorkspace = Schemas["UpdateWorkspace"];
export type LimitOverrides = Schemas["LimitOverrides"];
export type WorkspaceDeletion = Schemas["Deletion"];

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
  /**
   * Where `subscribe` connects: by default `<baseUrl>/api/realtime` (ws/wss);
   * in AWS, the stack's WebSocket API (its `RealtimeUrl` output,
   * `wss://….execute-api.….amazonaws.com/live`).
   */
  realtimeUrl?: string;
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

/** A chunk of a job's output stream; `cursor` orders them (resume after it). */
export interface StreamChunk {
  job_id: string;
  cursor: string;
  data: unknown;
}

/** What one response of the stream route carries: chunks, then `end` once the job has finished. */
export type StreamEvent = ({ type: "chunk" } & StreamChunk) | { type: "end"; job_id: string; status: JobStatus };

/** The part of a WebSocket a subscription uses: the browser's, or `ws`'s in Node. */
export interface WebSocketLike {
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: any) => void) | null;
  onclose: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** Jobs by id, or every job carrying one of the tags (the newest 100 of each at first). */
export type SubscribeTarget = string[] | { tags: string[] };

/**
 * `connecting` (also between reconnects), `open` (the WebSocket is up),
 * `polling` (no WebSocket: long-polls and the stream route), `closed`.
 */
export type SubscriptionStatus = "connecting" | "open" | "polling" | "closed";

export interface SubscribeOptions {
  signal?: AbortSignal;
  /** Also pass on the jobs' stream chunks to `onChunk` (jobs named by id only). */
  stream?: boolean;
  /**
   * `"now"` (default): the chunks written from the subscription on; `"start"`:
   * every chunk, the ones written before read from the stream route first.
   * Either way each chunk once, in order, reconnects included.
   */
  streamFrom?: "now" | "start";
  onChunk?: (chunk: StreamChunk) => void;
  /** What the server or the subscription could not do (a job the token does not open…); it goes on. */
  onError?: (detail: string) => void;
  onStatus?: (status: SubscriptionStatus) => void;
  /** A WebSocket class where there is no global one (Node 20: `import { WebSocket } from "ws"`). */
  WebSocket?: new (url: string) => WebSocketLike;
  /** Close once every job named is finished (default false: a retried job is followed on). */
  untilFinished?: boolean;
  /** Connections in a row that never open before the long-polls take over (default 3). */
  fallbackAfter?: number;
}

export interface Subscription {
  close(): void;
  readonly status: SubscriptionStatus;
}

/** Whether `job` is a newer state than `than` of the same job (by `updated_at`, to the microsecond). */
export function isNewer(job: Pick<Job, "updated_at">, than: Pick<Job, "updated_at">): boolean {
  return later(job.updated_at, than.updated_at);
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

async function ok<T>(call: Promise<{ data?: T; error?: unknown; response: Response }>): Promise<T> {
  const { data, error, response } = await call;
  if (!response.ok || data === undefined) throw await problemOf(response, error);
  return data;
}

/** For the calls that answer 204: only the status counts. */
async function done(call: Promise<{ error?: unknown; response: Response }>): Promise<void> {
  const { error, response } = await call;
  if (!response.ok) throw await problemOf(response, error);
}

type Token = string | (() => string | Promise<string>);

function client(
  baseUrl: string,
  token: Token,
  fetch: ((request: Request) => Promise<Response>) | undefined,
): Client<paths> {
  const api = createClient<paths>({
    baseUrl: baseUrl.replace(/\/$/, ""),
    fetch: fetch ?? ((req: Request) => globalThis.fetch(req)),
  });
  api.use({
    async onRequest({ request }) {
      const t = typeof token === "function" ? await token() : token;
      request.headers.set("Authorization", `Bearer ${t}`);
      return request;
    },
  });
  return api;
}

/** Server-sent events, as they come: each with its `event`, `data` and `id`. */
async function* serverSentEvents(body: ReadableStream<Uint8Array>) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = "";
  let data: string[] = [];
  let id: string | undefined;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      for (let end = buffer.search(/[\r\n]/); end >= 0; end = buffer.search(/[\r\n]/)) {
        // A CR at the end of what came may be half of a CRLF.
        if (buffer[end] === "\r" && end === buffer.length - 1) break;
        const line = buffer.slice(0, end);
        buffer = buffer.slice(buffer.startsWith("\r\n", end) ? end + 2 : end + 1);
        if (line === "") {
          if (data.length) yield { event: event || "message", data: data.join("\n"), id };
          event = "";
          data = [];
          id = undefined;
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let v = colon < 0 ? "" : line.slice(colon + 1);
        if (v.startsWith(" ")) v = v.slice(1);
        if (field === "event") event = v;
        else if (field === "data") data.push(v);
        else if (field === "id") id = v;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

export class Offload {
  /** Every route of the OpenAPI document, typed: `api.GET("/api/workspaces/{ws}/stats", …)`. */
  readonly api: Client<paths>;
  readonly workspace: string;
  private readonly baseUrl: string;
  private readonly token: Token;
  private readonly realtimeAt: string | undefined;

  constructor(options: OffloadOptions) {
    this.workspace = options.workspace;
    this.realtime.workspace = options.workspace;
    this.baseUrl = options.baseUrl.replace(/\/$/, "");
    this.token = options.token;
    this.realtimeAt = options.realtimeUrl;
    this.api = client(options.baseUrl, options.token, options.fetch);
  }

  private get ws() {
    return { ws: this.workspace };
  }

  private ok<T>(call: Promise<{ data?: T; error?: unknown; response: Response }>): Promise<T> {
    return ok(call);
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

  deleteSchedule(id: string): Promise<void> {
    return done(
      this.api.DELETE("/api/workspaces/{ws}/schedules/{id}", { params: { path: { ...this.ws, id } } }),
    );
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

  /** The jobs a job created (a `fan_out`'s children), in the order it created them, a page at a time. */
  children(
    id: string,
    query: { cursor?: string; limit?: number } = {},
    options: { signal?: AbortSignal } = {},
  ): Promise<JobList> {
    return this.ok(
      this.api.GET("/api/workspaces/{ws}/jobs/{id}/children", {
        params: { path: { ...this.ws, id }, query },
        signal: options.signal,
      }),
    );
  }

  /**
   * One response of a job's output stream (the stream route's server-sent
   * events): the chunks after `cursor` (from the start without it), then
   * those written while it lasts (up to 25 s), then `end` when the job has
   * finished. Read again from the last chunk's cursor to go on.
   */
  async *readStream(
    id: string,
    options: { cursor?: string; signal?: AbortSignal } = {},
  ): AsyncGenerator<StreamEvent> {
    const { data, error, response } = await this.api.GET("/api/workspaces/{ws}/jobs/{id}/stream", {
      params: { path: { ...this.ws, id }, query: options.cursor ? { cursor: options.cursor } : {} },
      parseAs: "stream",
      signal: options.signal,
    });
    if (!response.ok || !data) throw await problemOf(response, error);
    for await (const ev of serverSentEvents(data)) {
      if (ev.event === "chunk" && ev.id !== undefined) {
        yield { type: "chunk", job_id: id, cursor: ev.id, data: JSON.parse(ev.data) };
      } else if (ev.event === "end") {
        yield { type: "end", job_id: id, status: JSON.parse(ev.data).status };
        return;
      }
    }
  }

  /**
   * Follows jobs (by id) or tags live over the realtime WebSocket: `onJob`
   * gets each job's state at once, then every change, in order (a state no
   * newer than the last passed on is dropped). A dropped connection is
   * opened again with backoff (0.5 s doubling to 30 s, jittered) and
   * subscribes again (the server sends the states first, so nothing final is
   * missed). Where no WebSocket opens (no `WebSocket` class, or the upgrade
   * refused `fallbackAfter` times in a row, as on AWS Lambda), jobs by id are
   * followed by `watchJob`'s long-polls and their streams by the stream
   * route; tags cannot be, and `onError` says so.
   */
  subscribe(target: SubscribeTarget, onJob: (job: Job) => void, options: SubscribeOptions = {}): Subscription {
    return new Follower(this.realtime, target, onJob, options);
  }

  /** What subscriptions share: among it, whether the realtime route was found refused. */
  private readonly realtime: Host = {
    workspace: "",
    realtimeUrl: () => this.realtimeUrl(),
    watchJob: (id, on, o) => this.watchJob(id, on, o),
    readStream: (id, o) => this.readStream(id, o),
    retryable,
    realtimeRefused: false,
  };

  /** `ws(s)://…/api/realtime?token=…` with a token got now; null where there is no origin to go by. */
  private async realtimeUrl(): Promise<string | null> {
    let url: URL;
    try {
      url = new URL(
        this.realtimeAt ?? `${this.baseUrl}/api/realtime`,
        (globalThis as { location?: { href: string } }).location?.href,
      );
    } catch {
      return null;
    }
    url.protocol = url.protocol === "https:" || url.protocol === "wss:" ? "wss:" : "ws:";
    const t = typeof this.token === "function" ? await this.token() : this.token;
    url.searchParams.set("token", t);
    return url.toString();
  }

  /**
   * A token for a web page that opens only the jobs named (and their
   * children) and the jobs carrying the tags: reading them, their logs and
   * stream, the realtime channel, and cancelling with the `cancel` scope.
   * Made on a server (with an API key or the user's token), handed to the page.
   */
  createBrowserToken(body: CreateBrowserToken = {}): Promise<BrowserToken> {
    return this.ok(
      this.api.POST("/api/workspaces/{ws}/browser-tokens", { params: { path: this.ws }, body }),
    );
  }

  /** Completes a wait token (a waiting job's `wait.token`): an `approval` completes with `{data}`. */
  completeToken(token: string, data: unknown = {}): Promise<CompletedToken> {
    return this.ok(
      this.api.POST("/api/workspaces/{ws}/tokens/{token}/complete", {
        params: { path: { ...this.ws, token } },
        body: { data: data as Record<string, unknown> },
      }),
    );
  }

  /** The workspace's members (admins only: 403 otherwise). */
  async listMembers(): Promise<Member[]> {
    return (await this.ok(this.api.GET("/api/workspaces/{ws}/members", { params: { path: this.ws } }))).members;
  }

  /** Adds a member, or gives one already there (same subject and issuer) the role. */
  addMember(member: PutMember): Promise<Member> {
    return this.ok(
      this.api.POST("/api/workspaces/{ws}/members", { params: { path: this.ws }, body: member }),
    );
  }

  removeMember(id: string): Promise<void> {
    return done(
      this.api.DELETE("/api/workspaces/{ws}/members/{id}", { params: { path: { ...this.ws, id } } }),
    );
  }

  /** The workspace's API keys, without their secrets (admins only). */
  async listApiKeys(): Promise<ApiKey[]> {
    return (await this.ok(this.api.GET("/api/workspaces/{ws}/api-keys", { params: { path: this.ws } })))
      .api_keys;
  }

  /** A new key; its secret is in `key`, in this answer only. */
  async createApiKey(body: CreateApiKey): Promise<ApiKey & { key: string }> {
    const created = await this.ok(
      this.api.POST("/api/workspaces/{ws}/api-keys", { params: { path: this.ws }, body }),
    );
    return created as ApiKey & { key: string };
  }

  revokeApiKey(id: string): Promise<void> {
    return done(
      this.api.DELETE("/api/workspaces/{ws}/api-keys/{id}", { params: { path: { ...this.ws, id } } }),
    );
  }
}

export interface OffloadPlatformOptions {
  /** Where the API is, e.g. `https://jobs.example.com`. */
  baseUrl: string;
  /** A platform key (`ofp_…`): it creates, changes and deletes workspaces, and manages their members. */
  platformKey: string | (() => string | Promise<string>);
  fetch?: (request: Request) => Promise<Response>;
}

/**
 * The platform routes, for the server of an app that gives each of its
 * tenants a workspace: create (idempotent by `external_id`), find, change and
 * delete workspaces, and manage who is a member of each.
 */
export class OffloadPlatform {
  readonly api: Client<paths>;

  constructor(options: OffloadPlatformOptions) {
    this.api = client(options.baseUrl, options.platformKey, options.fetch);
  }

  /** A new workspace; with an `external_id` already used, that workspace (unchanged). */
  createWorkspace(body: CreateWorkspace): Promise<Workspace> {
    return ok(this.api.POST("/api/workspaces", { body }));
  }

  /** The workspace with this `external_id`, or null. */
  async findWorkspace(externalId: string): Promise<Workspace | null> {
    const list = await ok(
      this.api.GET("/api/workspaces", { params: { query: { external_id: externalId } } }),
    );
    return list.workspaces[0] ?? null;
  }

  /** One page of workspaces, oldest first; pass `next_cursor` back as `cursor` for the next. */
  listWorkspacesPage(query: { cursor?: string; limit?: number } = {}): Promise<WorkspaceList> {
    return ok(this.api.GET("/api/workspaces", { params: { query } }));
  }

  getWorkspace(ws: string): Promise<Workspace> {
    return ok(this.api.GET("/api/workspaces/{ws}", { params: { path: { ws } } }));
  }

  /** Each field given replaces the stored one (`limits: {max_running: null}` goes back to the tier's). */
  updateWorkspace(ws: string, body: UpdateWorkspace): Promise<Workspace> {
    return ok(this.api.PATCH("/api/workspaces/{ws}", { params: { path: { ws } }, body }));
  }

  /**
   * Closes the workspace at once to its members and keys; its jobs, files and
   * rows are removed by the job returned (follow its `progress`).
   */
  deleteWorkspace(ws: string): Promise<WorkspaceDeletion> {
    return ok(this.api.DELETE("/api/workspaces/{ws}", { params: { path: { ws } } }));
  }

  async listMembers(ws: string): Promise<Member[]> {
    return (await ok(this.api.GET("/api/workspaces/{ws}/members", { params: { path: { ws } } }))).members;
  }

  /** Adds a member (their identity provider's `subject`, and `issuer`), or changes the role of one. */
  addMember(ws: string, member: PutMember): Promise<Member> {
    return ok(this.api.POST("/api/workspaces/{ws}/members", { params: { path: { ws } }, body: member }));
  }

  removeMember(ws: string, id: string): Promise<void> {
    return done(this.api.DELETE("/api/workspaces/{ws}/members/{id}", { params: { path: { ws, id } } }));
  }
}

/** `new Offload(options)`. */
export function createOffload(options: OffloadOptions): Offload {
  return new Offload(options);
}
