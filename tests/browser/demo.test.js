// The demo page in real headless Chromium (Debian's `chromium`, driven by
// playwright-core): two pages, two users, one room, messages both ways, over
// a plain WebSocket, SockJS xhr-streaming (forced) and SockJS xhr-polling
// (forced), against the real gateway relaying to the local RabbitMQ.
// Screenshots go to target/artifacts/.
//
// Run: `npm run test:browser --prefix tests/node` (after
// `cargo build -p stomp-gateway`). Chromium: $CHROMIUM, else /usr/bin/chromium.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const nodeDir = path.join(__dirname, '..', 'node');
const { chromium } = require(require.resolve('playwright-core', { paths: [nodeDir] }));
const { startGateway, TARGET } = require(path.join(nodeDir, 'gateway-process'));

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.join(TARGET, 'artifacts');
const FLAGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const WAIT = 15000;

let gw;
let browser;

before(async () => {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  gw = await startGateway('browser-demo');
  // playwright-core launches with a fresh temporary profile (user data dir).
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: FLAGS });
});

after(async () => {
  if (browser) await browser.close();
  if (gw) await gw.stop();
});

async function join(context, name, room, transport) {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  const q = new URLSearchParams({ name, room, transport, autojoin: '1' });
  await page.goto(`${gw.url}/?${q}`);
  await page.waitForSelector('body[data-joined="yes"]', { timeout: WAIT });
  page.errors = errors;
  return page;
}

async function say(page, text) {
  await page.fill('#message', text);
  await page.click('#send');
}

async function sees(page, sender, text) {
  await page.waitForFunction(
    ([s, t]) => [...document.querySelectorAll('#messages li')].some(
      (li) => li.dataset.sender === s && li.textContent.endsWith(t)),
    [sender, text],
    { timeout: WAIT },
  );
}

const CASES = [
  { transport: 'native', shown: 'websocket (plain)' },
  { transport: 'xhr-streaming', shown: 'SockJS xhr-streaming' },
  { transport: 'xhr-polling', shown: 'SockJS xhr-polling' },
];

for (const { transport, shown } of CASES) {
  test(`demo chat between two browser pages over ${transport}`, async () => {
    const room = `room-${transport}-${crypto.randomBytes(3).toString('hex')}`;
    // Two contexts: two users with nothing shared (cookies, storage).
    const [ca, cb] = [await browser.newContext(), await browser.newContext()];
    try {
      const alice = await join(ca, 'alice', room, transport);
      const bob = await join(cb, 'bob', room, transport);
      for (const p of [alice, bob]) {
        assert.equal(await p.textContent('#transport-used'), shown);
        assert.equal(await p.textContent('#room-used'), room);
      }
      await say(alice, 'Hello Bob, café ☕');
      await sees(bob, 'alice', 'Hello Bob, café ☕');
      await sees(alice, 'alice', 'Hello Bob, café ☕');
      await say(bob, 'Hi Alice! 日本語 🎉');
      await sees(alice, 'bob', 'Hi Alice! 日本語 🎉');
      await bob.screenshot({ path: path.join(ARTIFACTS, `demo-${transport}.png`) });
      assert.deepEqual(alice.errors, []);
      assert.deepEqual(bob.errors, []);
    } finally {
      await ca.close();
      await cb.close();
    }
  });
}
