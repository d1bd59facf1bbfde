// Following jobs live: the realtime WebSocket (`/api/realtime`) with
// reconnects, and, where no WebSocket can be opened (AWS Lambda, Node 20
// without one), the long-polls of `watchJob` and the stream route instead.
// Only types come from index.ts; what runs is handed over as a `Host`.

import type {
  Job,
  StreamChunk,
  StreamEvent,
  SubscribeOptions,
  SubscribeTarget,
  Subscription,
  SubscriptionStatus,
  WatchOptions,
  WatchUpdate,
  WebSocketLike,
} from "./index.js";

/** What a subscription needs of its `Offload`. */
export interface Host {
  workspace: string;
  /** The realtime URL with a fresh token; null when none can be made (no origin). */
  realtimeUrl(): Promise<string | null>;
  watchJob(id: string, onUpdate: (u: WatchUpdate) => void, options: WatchOptions): Promise<Job>;
  readStream(id: string, options: { cursor?: string; signal?: AbortSignal }): AsyncGenerator<StreamEvent>;
  retryable(e: unknown): boolean;
  /** Set once a subscription found the upgrade refused: the next ones go to the long-polls at once. */
  realtimeRefused: boolean;
}

const FINISHED = new Set<string>(["completed", "cancelled", "dead"]);
/** The server takes at most this many jobs in one subscribe. */
const JOBS_PER_MESSAGE = 100;
/** A backlog read ends when the stream route has been quiet this long (its backlog comes at once). */
const QUIET_MS = 1000;

/**
 * An RFC 3339 time as [milliseconds, the nanoseconds below them]: the API
 * writes microseconds, which `Date` drops.
 */
function instant(iso: string): [number, number] {
  const frac = /\.(\d+)/.exec(iso)?.[1] ?? "";
  return [Date.parse(iso), Number(frac.slice(3, 9).padEnd(6, "0"))];
}

/** Whether the time `a` is after `b` (both RFC 3339, as `updated_at`). */
export function later(a: string, b: string): boolean {
  const [am, an] = instant(a);
  const [bm, bn] = instant(b);
  return am > bm || (am === bm && an > bn);
}

/** 0.5 s doubling to 30 s, each between half and all of it (so reconnecting browsers spread out). */
export function backoff(failures: number): number {
  return Math.min(500 * 2 ** failures, 30_000) * (0.5 + Math.random() / 2);
}

const sleep = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    if (signal.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });

/** A callback's exception is the caller's: it is thrown on its own, and the subscription goes on. */
function safely(f: () => void) {
  try {
    f();
  } catch (e) {
    setTimeout(() => {
      throw e;
    });
  }
}

const describe = (e: unknown) =>
  e && typeof e === "object" && "message" in e ? String((e as Error).message) : String(e);

/** One job's stream as this subscription has passed it on. */
interface StreamState {
  /** The cursor of the last chunk passed on; null: none yet, and the backlog is not wanted. */
  after: number | null;
  /** Chunks of the socket held while the backlog (or the gap of a reconnect) is read. */
  holding: boolean;
  held: StreamChunk[];
}

export class Follower implements Subscription {
  status: SubscriptionStatus = "connecting";
  private closed = false;
  private finishing = false;
  private readonly ids: string[];
  private readonly tags: string[];
  private ws: WebSocketLike | null = null;
  /** Ends what belongs to the current connection (its backlog reads). */
  private connection = new AbortController();
  /** Ends everything: long-polls, stream reads, timers. */
  private readonly stop = new AbortController();
  private timer: ReturnType<typeof setTimeout> | undefined;
  /** Connections in a row that brought nothing (for the backoff). */
  private failures = 0;
  /** Connections in a row that never opened (the upgrade refused, or no server). */
  private refusals = 0;
  private readonly delivered = new Map<string, string>();
  private readonly finished = new Set<string>();
  private readonly streams = new Map<string, StreamState>();
  /** Jobs whose state came on the current connection: their subscription is in place. */
  private readonly confirmed = new Set<string>();

  constructor(
    private readonly host: Host,
    target: SubscribeTarget,
    private readonly onJob: (job: Job) => void,
    private readonly options: SubscribeOptions,
  ) {
    this.ids = Array.isArray(target) ? [...new Set(target)] : [];
    this.tags = Array.isArray(target) ? [] : [...new Set(target.tags)];
    if (!this.ids.length && !this.tags.length) throw new TypeError("subscribe: name at least one job or tag");
    if (options.stream) {
      for (const id of this.ids) {
        this.streams.set(id, { after: options.streamFrom === "start" ? 0 : null, holding: false, held: [] });
      }
    }
    const { signal } = options;
    if (signal?.aborted) {
      this.closed = true;
      this.status = "closed";
      return;
    }
    signal?.addEventListener("abort", () => this.close(), { once: true });
    void this.connect();
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    this.connection.abort();
    this.stop.abort();
    const ws = this.ws;
    this.ws = null;
    ws?.close(1000, "closed by the client");
    this.setStatus("closed");
  }

  private setStatus(s: SubscriptionStatus) {
    if (s === this.status) return;
    this.status = s;
    const on = this.options.onStatus;
    if (on) safely(() => on(s));
  }

  private error(detail: string) {
    const on = this.options.onError;
    if (on) safely(() => on(detail));
  }

  private async connect() {
    if (this.closed) return;
    const Socket = this.options.WebSocket ?? (globalThis as { WebSocket?: SubscribeOptions["WebSocket"] }).WebSocket;
    let url: string | null = null;
    try {
      url = Socket ? await this.host.realtimeUrl() : null;
    } catch (e) {
      // The token function failed: as a connection that did not open.
      this.error(`no token for the realtime connection: ${describe(e)}`);
      return this.refused();
    }
    if (this.closed) return;
    if (!Socket || !url || this.host.realtimeRefused) return this.fallBack();
    let ws: WebSocketLike;
    try {
      ws = new Socket(url);
    } catch {
      return this.refused();
    }
    this.ws = ws;
    this.connection = new AbortController();
    this.confirmed.clear();
    // Until this connection's subscription is confirmed, chunks are held: what
    // came before them is read from the stream route first.
    for (const s of this.streams.values()) {
      s.holding = s.after !== null;
      s.held = [];
    }
    let opened = false;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      opened = true;
      this.refusals = 0;
      this.setStatus("open");
      for (let i = 0; i < Math.max(this.ids.length, 1); i += JOBS_PER_MESSAGE) {
        const jobs = this.ids.slice(i, i + JOBS_PER_MESSAGE);
        const tags = i === 0 ? this.tags : [];
        if (!jobs.length && !tags.length) continue;
        ws.send(
          JSON.stringify({ action: "subscribe", workspace: this.host.workspace, jobs, tags, stream: !!this.options.stream }),
        );
      }
    };
    ws.onmessage = (ev: { data: unknown }) => {
      if (this.ws !== ws) return;
      this.failures = 0;
      this.message(ev.data);
    };
    ws.onerror = () => {
      /* a close follows */
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.connection.abort();
      if (this.closed) return;
      if (!opened) return this.refused();
      this.setStatus("connecting");
      this.retry();
    };
  }

  /** A connection that never opened: again later, or the long-polls after several in a row. */
  private refused() {
    if (this.closed) return;
    this.refusals += 1;
    if (this.refusals >= (this.options.fallbackAfter ?? 3)) {
      if (this.ids.length) {
        this.host.realtimeRefused = true;
        return this.fallBack();
      }
      if (this.refusals === (this.options.fallbackAfter ?? 3)) {
        this.error("the realtime channel cannot be reached, and tags have no long-poll to fall back to; still trying");
      }
    }
    this.setStatus("connecting");
    this.retry();
  }

  private retry() {
    const ms = backoff(this.failures);
    this.failures += 1;
    this.timer = setTimeout(() => void this.connect(), ms);
  }

  private message(data: unknown) {
    let msg: any;
    try {
      msg = JSON.parse(typeof data === "string" ? data : String(data));
    } catch {
      return;
    }
    if (msg?.type === "job" && msg.job && typeof msg.job.id === "string") {
      this.confirm(msg.job.id);
      this.deliver(msg.job as Job);
    } else if (msg?.type === "chunk" && typeof msg.job_id === "string") {
      const chunk: StreamChunk = { job_id: msg.job_id, cursor: String(msg.cursor), data: msg.data };
      const s = this.streams.get(chunk.job_id);
      if (s?.holding) s.held.push(chunk);
      else this.emit(chunk);
    } else if (msg?.type === "error") {
      this.error(String(msg.detail ?? "the realtime channel reported an error"));
    }
  }

  /** A job's first state on this connection: its chunks flow from now on; what came before is read. */
  private confirm(id: string) {
    if (this.confirmed.has(id)) return;
    this.confirmed.add(id);
    const s = this.streams.get(id);
    if (s?.holding) void this.backfill(id, s, this.connection.signal);
  }

  /**
   * Reads the chunks after `s.after` from the stream route while the socket's
   * are held: until the route reaches the first held chunk, ends (a finished
   * job), or is quiet (its backlog comes at once; what follows comes over the
   * socket, whose feed was in place before this read began). Then the held
   * chunks, each once. A connection that drops meanwhile drops its held
   * chunks too: the next one reads them again.
   */
  private async backfill(id: string, s: StreamState, signal: AbortSignal) {
    for (let tries = 0; !signal.aborted; tries++) {
      const read = new AbortController();
      const stop = () => read.abort();
      signal.addEventListener("abort", stop, { once: true });
      let quiet = setTimeout(stop, QUIET_MS);
      try {
        for await (const ev of this.host.readStream(id, { cursor: s.after ? String(s.after) : undefined, signal: read.signal })) {
          clearTimeout(quiet);
          if (ev.type === "end") break;
          this.emit(ev);
          const first = s.held[0];
          if (first && Number(ev.cursor) >= Number(first.cursor)) break;
          quiet = setTimeout(stop, QUIET_MS);
        }
        break;
      } catch (e) {
        if (read.signal.aborted) break; // quiet, or the connection went
        if (!this.host.retryable(e) || tries >= 4) {
          this.error(`the stream of job ${id} could not be read: ${describe(e)}`);
          break;
        }
        await sleep(backoff(tries), signal);
      } finally {
        clearTimeout(quiet);
        signal.removeEventListener("abort", stop);
      }
    }
    if (signal.aborted) return;
    const held = s.held.sort((a, b) => Number(a.cursor) - Number(b.cursor));
    s.held = [];
    s.holding = false;
    for (const c of held) this.emit(c);
  }

  /** Passes a chunk on unless it was passed on already. */
  private emit(chunk: StreamChunk) {
    const s = this.streams.get(chunk.job_id);
    const n = Number(chunk.cursor);
    if (s) {
      if (s.after !== null && n <= s.after) return;
      s.after = n;
    }
    const on = this.options.onChunk;
    const { job_id, cursor, data } = chunk;
    if (on) safely(() => on({ job_id, cursor, data }));
  }

  /** Passes a state on when it is newer than the last passed on for its job. */
  private deliver(job: Job) {
    if (this.closed) return;
    const last = this.delivered.get(job.id);
    if (last !== undefined && !later(job.updated_at, last)) return;
    this.delivered.set(job.id, job.updated_at);
    if (FINISHED.has(job.status)) this.finished.add(job.id);
    else this.finished.delete(job.id);
    safely(() => this.onJob(job));
    if (this.options.untilFinished && !this.finishing && this.ids.length && this.ids.every((id) => this.finished.has(id))) {
      this.finishing = true;
      void this.finish();
    }
  }

  /** Every job finished (`untilFinished`): the rest of their streams, then closed. */
  private async finish() {
    const ws = this.ws;
    this.ws = null;
    ws?.close(1000, "every job finished");
    clearTimeout(this.timer);
    this.connection.abort();
    const signal = this.stop.signal;
    await Promise.all(
      [...this.streams].map(async ([id, s]) => {
        try {
          for await (const ev of this.host.readStream(id, { cursor: s.after ? String(s.after) : undefined, signal })) {
            if (ev.type === "end") break;
            if (s.after !== null) this.emit(ev);
          }
        } catch {
          /* what came is passed on; the rest is the caller's to read */
        }
      }),
    );
    this.close();
  }

  /** No WebSocket: each job by long-polls, its stream by the stream route. */
  private fallBack() {
    if (this.closed) return;
    if (!this.ids.length) {
      this.error("following tags needs the realtime channel, and no WebSocket can be opened here");
      return this.close();
    }
    this.setStatus("polling");
    for (const id of this.ids) void this.poll(id);
    for (const [id, s] of this.streams) void this.follow(id, s);
  }

  private async poll(id: string) {
    const signal = this.stop.signal;
    let etag: string | undefined;
    while (!signal.aborted) {
      try {
        // Resolves when the job finishes; without `untilFinished` it is
        // followed on, from its last ETag (a retry brings it back).
        await this.host.watchJob(
          id,
          (u) => {
            etag = u.etag;
            this.deliver(u.job);
          },
          { signal, etag },
        );
      } catch (e) {
        if (signal.aborted) return;
        this.error(`job ${id} cannot be followed: ${describe(e)}`);
        return;
      }
    }
  }

  /** A job's stream by the stream route, each response from the last cursor, until its end. */
  private async follow(id: string, s: StreamState) {
    const signal = this.stop.signal;
    for (let failures = 0; !signal.aborted; ) {
      try {
        for await (const ev of this.host.readStream(id, { cursor: s.after ? String(s.after) : undefined, signal })) {
          if (ev.type === "end") return;
          this.emit(ev);
          failures = 0;
        }
        await sleep(250, signal);
      } catch (e) {
        if (signal.aborted) return;
        if (!this.host.retryable(e)) return this.error(`the stream of job ${id} cannot be read: ${describe(e)}`);
        await sleep(backoff(failures++), signal);
      }
    }
  }
}
