// Accessibility check of one page with axe-core in headless Chromium (playwright-core drives
// the system browser; nothing is downloaded). Usage:
//   node axe_check.mjs <url> <wait-for-css-selector> [<url> <selector> ...]
// Prints one JSON object: {"pages": [{"url", "violations": [{id, impact, help, nodes}]}]}.
// Exits 2 on a usage or browser error (the test fails loudly), 0 otherwise.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
// Evaluated through the DevTools protocol, which the page's CSP does not govern: the page is
// checked under its real policy.
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

const args = process.argv.slice(2);
if (args.length === 0 || args.length % 2 !== 0) {
  console.error("usage: axe_check.mjs <url> <selector> [<url> <selector> ...]");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await context.newPage();
  const pages = [];
  for (let i = 0; i < args.length; i += 2) {
    const [url, selector] = [args[i], args[i + 1]];
    await page.goto(url);
    await page.waitForSelector(selector, { timeout: 30000 });
    await page.evaluate(axeSource);
    const result = await page.evaluate(async () =>
      // eslint-disable-next-line no-undef
      axe.run(document, { runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"] } }));
    pages.push({
      url: page.url(),
      rules_passed: result.passes.length,
      violations: result.violations.map((v) => ({
        id: v.id,
        impact: v.impact,
        help: v.help,
        nodes: v.nodes.slice(0, 5).map((n) => n.target.join(" ") + " :: " + n.failureSummary),
      })),
    });
  }
  console.log(JSON.stringify({ pages }));
} catch (e) {
  console.error(String(e && e.stack || e));
  process.exitCode = 2;
} finally {
  await browser.close();
}
