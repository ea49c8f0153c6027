// The demo page in real headless Chromium (Debian's `chromium`, driven by
// playwright-core): two pages, two users, one room, messages both ways, over
// a plain WebSocket, SockJS xhr-streaming (forced) and SockJS xhr-polling
// (forced), against the real gateway relaying to the local RabbitMQ, and on
// the embedded broker; then
// the deploy/examples/chat.toml set-up: rooms on a chat exchange, messages
// through /app/chat.sendMessage and the example backend, or straight to the
// room while no backend runs. Screenshots go to target/artifacts/.
//
// Run: `npm run test:browser --prefix tests/node` (after
// `cargo build -p stomp-gateway`). Chromium: $CHROMIUM, else /usr/bin/chromium.
'use strict';

const { test, before, after } = require('node:test');
const { spawn } = require('node:child_process');
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
  gw = await startGateway('browser-demo', { sockjs: { test_services: 'true' } });
  // playwright-core launches with a fresh temporary profile (user data dir).
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: FLAGS });
});

after(async () => {
  if (browser) await browser.close();
  if (gw) await gw.stop();
});

async function join(context, name, room, transport, url = gw.url) {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  const q = new URLSearchParams({ name, room, transport, autojoin: '1' });
  await page.goto(`${url}/?${q}`);
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

test('demo chat on the embedded broker (no RabbitMQ in the path), SockJS and plain WebSocket', async () => {
  const embedded = await startGateway('browser-demo-embedded', { broker: { mode: '"embedded"' } });
  const [ca, cb] = [await browser.newContext(), await browser.newContext()];
  try {
    const room = `embedded-${crypto.randomBytes(3).toString('hex')}`;
    const alice = await join(ca, 'alice', room, 'xhr-polling', embedded.url);
    const bob = await join(cb, 'bob', room, 'native', embedded.url);
    assert.equal(await alice.textContent('#transport-used'), 'SockJS xhr-polling');
    await say(alice, 'hello from the embedded broker');
    await sees(bob, 'alice', 'hello from the embedded broker');
    await say(bob, 'réponse ✓');
    await sees(alice, 'bob', 'réponse ✓');
    await alice.screenshot({ path: path.join(ARTIFACTS, 'demo-embedded.png') });
  } finally {
    await ca.close();
    await cb.close();
    await embedded.stop();
  }
});

// The transports Node cannot run (they need a DOM): sockjs-client in the
// page, against the SockJS test service /echo.
test('sockjs-client in Chromium over htmlfile, jsonp and the iframe transports', async () => {
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    await page.goto(`${gw.url}/`);
    for (const transport of ['iframe-htmlfile', 'iframe-eventsource', 'iframe-xhr-polling', 'jsonp-polling', 'eventsource']) {
      const result = await page.evaluate(([url, t]) => new Promise((resolve) => {
        const sock = new SockJS(url, null, { transports: [t] });
        const text = 'héllo \u2028 🎉 "q"';
        sock.onopen = () => sock.send(text);
        sock.onmessage = (e) => { resolve({ transport: sock.transport, echoed: e.data === text }); sock.close(); };
        sock.onclose = (e) => resolve({ closed: e.code, reason: e.reason });
      }), [`${gw.url}/echo`, transport]);
      assert.deepEqual(result, { transport, echoed: true }, transport);
    }
  } finally {
    await context.close();
  }
});

const MANAGEMENT = 'http://127.0.0.1:15672/api';
const AUTH = 'Basic ' + Buffer.from('guest:guest').toString('base64');

test('demo chat as deploy/examples/chat.toml sets it up: through the backend, or straight to the room', async () => {
  const sfx = crypto.randomBytes(4).toString('hex');
  const chatExchange = `e2e.browser.chat.${sfx}`;
  const appExchange = `e2e.browser.app.${sfx}`;
  const backendQueue = `e2e.browser.backend.${sfx}`;
  // chat.toml's topology with this run's names.
  const topology = [
    '[[topology.exchanges]]', `name = "${chatExchange}"`, 'type = "topic"', '',
    '[[topology.queues]]', `name = "${backendQueue}"`, '',
    '[[topology.bindings]]', `exchange = "${appExchange}"`, `queue = "${backendQueue}"`, 'routing_key = "chat.*"', '',
  ].join('\n');
  const chat = await startGateway('browser-demo-chat', {
    app: { exchange: `"${appExchange}"` },
    demo: {
      room_destination: `"/exchange/${chatExchange}/room.{room}"`,
      send_destination: '"/app/chat.sendMessage"',
    },
  }, topology);
  let backend;
  const [ca, cb] = [await browser.newContext(), await browser.newContext()];
  try {
    // No backend yet: the page waits for its message, then sends it to the room.
    const room1 = `nobackend${sfx}`;
    const alice = await join(ca, 'alice', room1, 'xhr-streaming', chat.url);
    const bob = await join(cb, 'bob', room1, 'xhr-streaming', chat.url);
    assert.equal(await alice.isChecked('#via-app'), true);
    await say(alice, 'anyone there?');
    await sees(bob, 'alice', 'anyone there?');
    assert.match(await alice.textContent('#hint'), /did not answer/);
    assert.equal(await alice.isChecked('#via-app'), false);

    // The example backend runs: messages go through /app/chat.sendMessage.
    const bin = path.join(TARGET, 'debug', 'chat-backend');
    const lines = [];
    backend = spawn(bin, ['--app-exchange', appExchange, '--queue', backendQueue, '--chat-exchange', chatExchange],
      { env: { ...process.env, RUST_LOG: 'info,chat_backend=debug' }, stdio: ['ignore', 'pipe', 'pipe'] });
    for (const s of [backend.stdout, backend.stderr]) s.on('data', (d) => lines.push(...String(d).split('\n')));
    const deadline = Date.now() + WAIT;
    while (!lines.some((l) => l.includes('consuming'))) {
      assert.ok(Date.now() < deadline && backend.exitCode === null, `chat-backend did not start: ${lines.join(' | ')}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    const room2 = `backend${sfx}`;
    const carol = await join(ca, 'carol', room2, 'websocket', chat.url);
    const dave = await join(cb, 'dave', room2, 'xhr-polling', chat.url);
    await say(carol, 'via the backend ✓');
    await sees(dave, 'carol', 'via the backend ✓');
    await say(dave, 'and back ✓');
    await sees(carol, 'dave', 'and back ✓');
    assert.equal(await carol.isChecked('#via-app'), true, 'no fallback needed');
    assert.ok(lines.some((l) => l.includes(`room ${room2}`)), `the backend relayed: ${lines.join(' | ')}`);
    await carol.screenshot({ path: path.join(ARTIFACTS, 'demo-chat-backend.png') });
  } finally {
    await ca.close();
    await cb.close();
    if (backend && backend.exitCode === null) backend.kill('SIGKILL');
    await chat.stop();
    for (const [kind, name] of [['queues', backendQueue], ['exchanges', chatExchange], ['exchanges', appExchange]]) {
      await fetch(`${MANAGEMENT}/${kind}/%2f/${encodeURIComponent(name)}`, {
        method: 'DELETE', headers: { authorization: AUTH },
      }).catch(() => {});
    }
  }
});
