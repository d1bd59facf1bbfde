// The dashboard in a real headless browser (Debian's Chromium driven by
// playwright-core) against a real `offload dev` and its PostgreSQL, started
// by scripts/e2e.sh, which passes OFFLOAD_URL, OFFLOAD_WORKSPACE,
// OFFLOAD_TOKEN, OFFLOAD_EXPIRING_TOKEN and SCREENSHOTS. Each screen is
// saved as a PNG under SCREENSHOTS.

import assert from "node:assert/strict";
import { createServer } from "node:http";
import { mkdirSync } from "node:fs";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";

const URL_ = process.env.OFFLOAD_URL;
const WS = process.env.OFFLOAD_WORKSPACE;
const TOKEN = process.env.OFFLOAD_TOKEN;
const SHOTS = process.env.SCREENSHOTS ?? "test-output/dashboard";
assert.ok(URL_ && WS && TOKEN, "run through scripts/e2e.sh");
mkdirSync(SHOTS, { recursive: true });

let browser, page;
const cspErrors = [];
/** What the page said and what failed to load, printed when a test fails. */
const pageLog = [];

async function api(method, path, body) {
  const resp = await fetch(`${URL_}/api/workspaces/${WS}${path}`, {
    method,
    headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" },
    body: body && JSON.stringify(body),
  });
  assert.ok(resp.ok, `${method} ${path}: ${resp.status} ${await resp.clone().text()}`);
  return resp.status === 204 ? null : resp.json();
}

/** Waits (up to 10 s) until the API says the job is in `status`. */
async function untilStatus(id, status) {
  for (let i = 0; i < 100 && (await api("GET", `/jobs/${id}`)).status !== status; i++) {
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Presses Tab until the focused element's label or text matches, then returns; no mouse. */
async function tabTo(pattern) {
  for (let i = 0; i < 80; i++) {
    await page.keyboard.press("Tab");
    const label = await page.evaluate(() => {
      const el = document.activeElement;
      if (!el) return "";
      const label = el.getAttribute("aria-label") ?? el.labels?.[0]?.textContent ?? el.textContent ?? "";
      return label.trim();
    });
    if (pattern.test(label)) return;
  }
  assert.fail(`no focusable element matching ${pattern} within 80 tabs`);
}

const shot = (name) => page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });

/**
 * A browser test: on failure, prints the page's address, its console and
 * failed requests, and the start of its HTML, then saves a screenshot, so
 * a failure on a machine nobody can look at says what the browser saw.
 */
function browserTest(name, fn) {
  test(name, async () => {
    pageLog.length = 0;
    try {
      await fn();
    } catch (err) {
      const html = await page.content().catch((e) => `(no content: ${e.message})`);
      console.error(
        `--- ${name}: the browser at ${page.url()}\n${pageLog.join("\n") || "(nothing logged)"}\n` +
          `--- HTML (first 1500 characters)\n${html.slice(0, 1500)}\n---`,
      );
      const file = `failed-${name.replace(/[^a-z0-9]+/gi, "-").slice(0, 60)}`;
      await shot(file).catch(() => {});
      throw err;
    }
  });
}

before(async () => {
  // The flags keep Chromium off the network it would reach at start-up (updates, sync,
  // safe browsing): on a closed network those connections are refused or hang.
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: 60_000,
  });
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(15_000);
  page.on("console", (m) => {
    if (/Content[- ]Security[- ]Policy/i.test(m.text())) cspErrors.push(m.text());
    pageLog.push(`console.${m.type()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => pageLog.push(`page error: ${e.stack ?? e.message}`));
  page.on("requestfailed", (r) => pageLog.push(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
  page.on("response", (r) => {
    if (r.status() >= 400) pageLog.push(`response ${r.status()}: ${r.request().method()} ${r.url()}`);
  });
  page.on("crash", () => pageLog.push("the page crashed"));
  page.on("dialog", (d) => d.accept());
});

after(async () => {
  // A browser that does not close must not hold the run: give it 10 s, then kill it.
  const closing = browser?.close();
  const timedOut = await Promise.race([
    closing?.then(() => false),
    new Promise((r) => setTimeout(() => r(true), 10_000).unref()),
  ]);
  if (timedOut) browser?.process?.()?.kill("SIGKILL");
});

browserTest("the page is served with a strict CSP and signs in with the keyboard only", async () => {
  const resp = await page.goto(`${URL_}/`);
  assert.equal(resp.status(), 200, `GET / answered ${resp.status()}: ${await resp.text()}`);
  assert.match(resp.headers()["content-type"] ?? "", /^text\/html/);
  const csp = resp.headers()["content-security-policy"];
  assert.match(csp, /script-src 'self'/);
  assert.doesNotMatch(csp, /unsafe-inline/);
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  await shot("signin");
  await page.keyboard.press("Tab");
  await page.keyboard.type(WS);
  await page.keyboard.press("Tab");
  await page.keyboard.type(TOKEN);
  await page.keyboard.press("Tab");
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Overview" }).waitFor();
  const stored = await page.evaluate(() => [sessionStorage.length, localStorage.length]);
  assert.deepEqual(stored, [2, 0], "the token is kept in session storage only");
});

browserTest("a running job's progress bar moves to 100 %", async () => {
  const job = await api("POST", "/jobs", { type: "sleep", payload: { ms: 4000, steps: 8 } });
  await page.goto(`${URL_}/#/jobs/${job.id}`);
  const bar = page.getByRole("progressbar", { name: "Job progress" });
  await bar.waitFor();
  const seen = new Set();
  for (let i = 0; i < 200; i++) {
    const v = await bar.getAttribute("value");
    if (v !== null) seen.add(Number(v));
    if (Number(v) === 100) break;
    await page.waitForTimeout(50);
  }
  assert.ok([...seen].some((v) => v > 0 && v < 100), `saw it move: ${[...seen]}`);
  assert.ok(seen.has(100), `reached 100: ${[...seen]}`);
  await page.locator(".badge", { hasText: "completed" }).first().waitFor();
  await page.getByText("8 of 8 processed").waitFor();
  await shot("job-detail");
});

browserTest("cancelling a running job shows cancelled and its partial result", async () => {
  const job = await api("POST", "/jobs", { type: "sleep", payload: { ms: 30000, steps: 60 } });
  await page.goto(`${URL_}/#/jobs/${job.id}`);
  await page.locator(".badge", { hasText: "running" }).first().waitFor({ timeout: 10_000 });
  await page.getByRole("button", { name: `Cancel job ${job.id}` }).click();
  await page.locator(".badge", { hasText: "cancelled" }).first().waitFor({ timeout: 15_000 });
  await page.locator(".json", { hasText: "steps_done" }).waitFor();
  const done = (await api("GET", `/jobs/${job.id}`)).result.steps_done;
  assert.ok(done > 0 && done < 60, `partial: ${done}`);
});

browserTest("a job that failed permanently is found in dead jobs, retried, and completes", async () => {
  let calls = 0;
  const receiver = createServer((req, res) => {
    calls += 1;
    res.writeHead(calls === 1 ? 400 : 200, { "Content-Type": "application/json" });
    res.end(calls === 1 ? '{"error":"not yet"}' : '{"ok":true}');
  });
  await new Promise((r) => receiver.listen(0, "127.0.0.1", r));
  // A listening receiver keeps the test process alive: it is closed however the test ends.
  try {
    const url = `http://127.0.0.1:${receiver.address().port}/hook`;
    const job = await api("POST", "/jobs", { type: "webhook", payload: { url, body: { n: 1 } } });
    await untilStatus(job.id, "dead");
    await page.goto(`${URL_}/#/dead`);
    const row = page.locator(`tr[data-job="${job.id}"]`);
    await row.waitFor();
    await page.getByLabel("Error contains").fill("400");
    await row.waitFor();
    await shot("dead-jobs");
    await row.getByRole("button", { name: `Retry job ${job.id}` }).click();
    await page.getByRole("status").filter({ hasText: "1 job sent to run again" }).waitFor();
    await page.goto(`${URL_}/#/jobs/${job.id}`);
    await page.locator(".badge", { hasText: "completed" }).first().waitFor({ timeout: 15_000 });
    assert.equal(calls, 2);
  } finally {
    receiver.closeAllConnections();
    receiver.close();
  }
});

browserTest("a job is found and cancelled with the keyboard only", async () => {
  const job = await api("POST", "/jobs", { type: "sleep", payload: { ms: 30000, steps: 60 }, tags: ["e2e-keys"] });
  await page.goto(`${URL_}/#/`);
  await page.getByRole("heading", { name: "Overview" }).waitFor();
  await tabTo(/^Jobs$/);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Jobs" }).waitFor();
  await tabTo(/^Tag/);
  await page.keyboard.type("e2e-keys");
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => location.hash.includes("tag=e2e-keys"));
  await page.locator(`tr[data-job="${job.id}"]`).waitFor();
  await tabTo(new RegExp(`Cancel job ${job.id}`));
  await page.keyboard.press("Enter");
  await untilStatus(job.id, "cancelled");
  assert.equal((await api("GET", `/jobs/${job.id}`)).status, "cancelled");
});

browserTest("the jobs table filters by status and tag, and fits a phone", async () => {
  const red = await api("POST", "/jobs/batch", {
    jobs: [1, 2, 3].map(() => ({ type: "noop", tags: ["e2e-red"] })),
  });
  await api("POST", "/jobs/batch", { jobs: [1, 2].map(() => ({ type: "noop", tags: ["e2e-blue"] })) });
  for (const j of red.jobs) await untilStatus(j.id, "completed");
  await page.goto(`${URL_}/#/jobs`);
  await page.getByLabel("Status").selectOption("completed");
  await page.getByLabel("Tag").fill("e2e-red");
  await page.getByRole("button", { name: "Apply" }).click();
  await page.waitForFunction(() => location.hash.includes("status=completed") && location.hash.includes("tag=e2e-red"));
  const rows = page.locator("table.jobs tbody tr[data-job]");
  await page.waitForFunction(() => document.querySelectorAll("table.jobs tbody tr[data-job]").length === 3);
  const ids = await rows.evaluateAll((trs) => trs.map((tr) => tr.dataset.job));
  assert.deepEqual(ids.sort(), red.jobs.map((j) => j.id).sort());
  await shot("jobs");
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(200);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - innerWidth);
  assert.ok(overflow <= 0, `the page scrolls sideways by ${overflow}px on a phone`);
  await shot("jobs-phone");
  await page.goto(`${URL_}/#/`);
  await page.getByText("Completed, last hour").waitFor();
  await shot("overview-phone");
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.reload();
  await page.getByText("Completed, last hour").waitFor();
  await page.waitForTimeout(500);
  await shot("overview");
});

browserTest("a schedule is created with its next run in its time zone, then deleted", async () => {
  await page.goto(`${URL_}/#/schedules`);
  await page.getByLabel("Name").fill("nightly e2e");
  await page.getByLabel("Cron (minute hour day month weekday)").fill("0 2 * * *");
  await page.getByLabel("Time zone").fill("Asia/Tokyo");
  await page.getByLabel("Job type").fill("noop");
  await page.getByRole("button", { name: "Create schedule" }).click();
  const row = page.locator("tr", { hasText: "nightly e2e" });
  await row.waitFor();
  const text = await row.innerText();
  assert.match(text, /GMT\+9|JST/, `next run shown in Tokyo time: ${text}`);
  await row.getByText("then").click();
  assert.equal(await row.locator("ul.plain li").count(), 4, "the four runs after the next");
  await shot("schedules");
  await row.getByRole("button", { name: "Delete schedule nightly e2e" }).click();
  await row.waitFor({ state: "detached" });
  assert.deepEqual((await api("GET", "/schedules")).schedules, []);
});

browserTest("an expired token returns to sign-in", async () => {
  const expiring = process.env.OFFLOAD_EXPIRING_TOKEN;
  const expiresAt = Number(process.env.OFFLOAD_EXPIRING_AT) * 1000;
  // The API allows 30 s of clock skew past `exp`.
  const wait = expiresAt + 31_000 - Date.now();
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  await page.evaluate(
    ([workspace, token]) => sessionStorage.setItem("offload.session", JSON.stringify({ workspace, token })),
    [WS, expiring],
  );
  // A fresh load, as when coming back to the tab later.
  await page.goto(`${URL_}/#/jobs`);
  await page.reload();
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  await page.getByRole("status").filter({ hasText: /Signed out: .*expired/ }).waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem("offload.session")), null);
  assert.equal(await page.getByLabel("Workspace id").inputValue(), WS, "the workspace is filled in again");
  await shot("signed-out");
  assert.deepEqual(cspErrors, [], "no Content-Security-Policy violation on any screen");
});
