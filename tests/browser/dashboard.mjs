// The dashboard as a person uses it, in headless Chromium (Debian's `chromium`, driven by
// playwright-core): open the URL `vmrepl dashboard` prints, read the relationship, the events
// and the lag chart, see the page refresh by itself, check that a browser without the token is
// turned away, and take a screenshot.
//
// Usage: node dashboard.mjs SIGN_IN_URL SCREENSHOT.png VM
// Env: CHROMIUM (default: `chromium` on PATH).
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";

const [url, shot, vm = "app"] = process.argv.slice(2);
if (!url || !shot) {
  console.error("usage: node dashboard.mjs SIGN_IN_URL SCREENSHOT.png [VM]");
  process.exit(2);
}
const executablePath =
  process.env.CHROMIUM || execFileSync("which", ["chromium"], { encoding: "utf8" }).trim();

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
  console.log("ok: " + what);
}

// Never hang the test suite: give up after two minutes.
setTimeout(() => {
  console.error("the browser test timed out");
  process.exit(1);
}, 120000).unref();

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  // The host's CA is private: the test browser does not know it.
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 1000 } });
  const page = await ctx.newPage();
  page.on("pageerror", (e) => console.log("page error: " + e.message));
  await page.goto(url);
  check(!page.url().includes("token="), "the token leaves the address bar (" + page.url() + ")");
  const cookies = await ctx.cookies();
  check(cookies.some((c) => c.name === "vmrepl_dashboard" && c.httpOnly && c.secure), "an HttpOnly Secure cookie holds the token");

  const row = page.locator(`[data-testid="relationship"][data-vm="${vm}"]`);
  await row.first().waitFor({ timeout: 15000 });
  check((await row.locator('[data-testid="rel-vm"]').first().innerText()).trim() === vm, `the relationship row shows ${vm}`);
  const state = (await row.locator('[data-testid="rel-state"]').first().innerText()).trim();
  check(state.length > 0, `its state is shown (${state})`);
  const health = (await row.locator('[data-testid="rel-health"]').first().innerText()).trim();
  check(["normal", "warning", "critical", "not-applicable"].includes(health), `its health is shown (${health})`);
  const hostName = (await page.locator('[data-testid="host-name"]').innerText()).trim();
  check(hostName.length > 0 && hostName !== "…", `the host header names the host (${hostName})`);
  check((await page.locator(`[data-testid="vm"][data-vm="${vm}"]`).count()) === 1, "the VMs table lists the VM");
  const events = await page.locator('[data-testid="event"]').count();
  check(events > 0, `recent events are listed (${events})`);
  check((await page.locator(`[data-testid="lag-chart"][data-vm="${vm}"]`).count()) === 1, "the lag chart is drawn as SVG");
  check((await page.locator(`[data-testid="lag-chart"][data-vm="${vm}"] path`).count()) >= 1, "the lag chart has its lines");
  check((await page.locator(`[data-testid="lag-chart"][data-vm="${vm}"] [data-testid="lag-line"]`).count()) === 1, "the lag line is drawn");
  check((await page.locator(`[data-testid="stats-vm"][data-vm="${vm}"]`).count()) >= 1, "the statistics block shows the VM");

  // It refreshes by itself: the "updated" time moves on without a reload.
  const updated = page.locator('[data-testid="updated"]');
  const first = (await updated.innerText()).trim();
  check(/^updated \d\d:\d\d:\d\d$/.test(first), `the page tells when it was updated (${first})`);
  await page.waitForFunction(
    (before) => {
      const t = document.querySelector('[data-testid="updated"]').textContent.trim();
      return t !== before && t.startsWith("updated ");
    },
    first,
    { timeout: 20000 },
  );
  check(true, `it refreshed by itself (${(await updated.innerText()).trim()})`);
  await page.screenshot({ path: shot, fullPage: true });
  console.log("screenshot: " + shot);

  // How a troubled relationship looks: the same page fed a copy of the JSON in which the
  // relationship is Critical with reasons and a resynchronization is half done.
  await page.route("**/api/overview", async (route) => {
    const resp = await route.fetch();
    const o = await resp.json();
    for (const r of o.relationships) {
      r.health = "critical";
      r.health_details = ["Resynchronization is required.", "No cycle succeeded for 30 minutes."];
      r.progress = { what: "resynchronization: comparing with the replica", bytes_done: 32 << 20, bytes_total: 64 << 20, rate_bytes_per_sec: 1 << 20 };
    }
    await route.fulfill({ response: resp, json: o });
  });
  const badge = row.locator('[data-testid="rel-health"]').first();
  await page.waitForFunction(
    (vm) => document.querySelector(`[data-testid="relationship"][data-vm="${vm}"] [data-testid="rel-health"]`)?.textContent === "critical",
    vm,
    { timeout: 20000 },
  );
  check((await badge.getAttribute("class")).includes("critical"), "a Critical health is colored as such");
  const reasons = await row.locator('[data-testid="health-reasons"] li').allInnerTexts();
  check(reasons.includes("Resynchronization is required."), `the health's reasons are listed (${reasons.join(" / ")})`);
  const bar = row.locator('[data-testid="progress"] [role="progressbar"]');
  check((await bar.getAttribute("aria-valuenow")) === "50", "the resynchronization's progress bar shows 50 %");
  await page.unroute("**/api/overview");

  // A browser without the token (no cookie) is turned away, with what to run.
  const stranger = await browser.newContext({ ignoreHTTPSErrors: true });
  const p2 = await stranger.newPage();
  const base = new URL(url);
  base.search = "";
  const resp = await p2.goto(base.toString());
  check(resp.status() === 401, `without the token: ${resp.status()}`);
  const text = await p2.locator('[data-testid="unauthorized"]').innerText();
  check(text.includes("vmrepl dashboard"), `the refusal says to run vmrepl dashboard (${text})`);
  const api = await p2.goto(new URL("/api/overview", base).toString());
  check(api.status() === 401, "the JSON is refused too");
  base.searchParams.set("token", "0".repeat(64));
  check((await p2.goto(base.toString())).status() === 401, "a wrong token is refused");
  await stranger.close();
} finally {
  await browser.close();
}
console.log("dashboard browser test passed");
