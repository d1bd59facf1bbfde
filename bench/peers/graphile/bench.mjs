// graphile-worker beside Offload's benchmark: one round in one empty database
// (made and dropped by scripts/bench-peers.sh). Prints `name value unit` lines:
//   graphile_add_jobs_batch           jobs/s  B addJobs() calls of 1000 no-op jobs each
//   graphile_add_jobs_batch_1000_p50  ms      the median time of one such call
//   graphile_drain_batched            jobs/s  N queued no-op jobs drained with the batching
//                                             options as graphile-worker's performance
//                                             page sets them: localQueue.size 500,
//                                             completeJobBatchDelay 0, failJobBatchDelay 0
//   graphile_drain_plain              jobs/s  the same drain without them
// Both drains: one runner, concurrency 24, a pool of 25 (the performance page's).
// graphile-worker 0.17.3: the newest that runs on Node 20 (0.18 needs Node 22.18).
// A drain is timed from run() until every job is deleted (graphile-worker deletes a
// job on completion), so batched completions are counted once they are committed.
//
// node bench.mjs --url postgres://… [--jobs 20000] [--batches 20] [--concurrency 24]
//                [--local-queue 500] [--skip-plain]

import pg from "pg";
import { Logger, makeWorkerUtils, run } from "graphile-worker";

const opts = { url: "", jobs: 20000, batches: 20, concurrency: 24, "local-queue": 500, "skip-plain": false };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const key = argv[i].replace(/^--/, "");
  if (!(key in opts)) throw new Error(`unknown option ${argv[i]}`);
  opts[key] = typeof opts[key] === "boolean" ? true : typeof opts[key] === "number" ? Number(argv[++i]) : argv[++i];
}
if (!opts.url) throw new Error("--url is needed");

// Errors and warnings to stderr; graphile-worker's info lines would mix with the figures.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`graphile-worker ${level}: ${message}`);
});
const pgPool = new pg.Pool({ connectionString: opts.url, max: opts.concurrency + 1 });
const onError = (e) => console.error(`pg: ${e.message}`);
pgPool.on("error", onError);
pgPool.on("connect", (client) => client.on("error", onError));
const utils = await makeWorkerUtils({ pgPool, logger });
await utils.migrate();

const noop = (n) => Array.from({ length: n }, () => ({ identifier: "noop", payload: {} }));
const count = async () =>
  Number((await pgPool.query("SELECT count(*) FROM graphile_worker._private_jobs")).rows[0].count);
const median = (v) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const print = (name, value, unit) => console.log(`${name} ${value.toFixed(2)} ${unit}`);

// Enqueue: one untimed call first (warm pool and JIT), then B timed calls.
await utils.addJobs(noop(1000));
const batch = noop(1000);
const ms = [];
const t0 = performance.now();
for (let b = 0; b < opts.batches; b++) {
  const t = performance.now();
  await utils.addJobs(batch);
  ms.push(performance.now() - t);
}
const secs = (performance.now() - t0) / 1000;
print("graphile_add_jobs_batch", (opts.batches * 1000) / secs, "jobs/s");
print("graphile_add_jobs_batch_1000_p50", median(ms), "ms");
await pgPool.query("TRUNCATE graphile_worker._private_jobs CASCADE");

// Queues n jobs (untimed), then drains them with a fresh runner; returns jobs/s.
async function drain(n, batched) {
  for (let left = n; left > 0; left -= 1000) await utils.addJobs(noop(Math.min(1000, left)));
  let done = 0;
  let allRan;
  const ran = new Promise((r) => (allRan = r));
  const worker = batched
    ? { localQueue: { size: opts["local-queue"] }, completeJobBatchDelay: 0, failJobBatchDelay: 0 }
    : {};
  const start = performance.now();
  const runner = await run({
    pgPool,
    logger,
    concurrency: opts.concurrency,
    noHandleSignals: true,
    taskList: { noop: async () => { if (++done === n) allRan(); } },
    preset: { worker },
  });
  await ran;
  while ((await count()) > 0) await sleep(5);
  const rate = n / ((performance.now() - start) / 1000);
  await runner.stop();
  if (done !== n) throw new Error(`${done} of ${n} jobs ran`);
  return rate;
}

await drain(Math.max(1, Math.floor(opts.jobs / 10)), true); // warm-up, not reported
print("graphile_drain_batched", await drain(opts.jobs, true), "jobs/s");
if (!opts["skip-plain"]) print("graphile_drain_plain", await drain(opts.jobs, false), "jobs/s");

await utils.release();
await pgPool.end();
