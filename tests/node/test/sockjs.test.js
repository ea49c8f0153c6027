// SockJS compatibility: sockjs-client 1.x + @stomp/stompjs v7 (what Spring
// frontends use with `new SockJS(url)`) against the real stomp-gateway binary
// relaying to the local RabbitMQ, one forced transport at a time.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const SockJS = require('sockjs-client');
const { Client } = require('@stomp/stompjs');
const { startGateway, withTimeout } = require('../gateway-process');

const TRANSPORTS = ['websocket', 'xhr-streaming', 'xhr-polling', 'eventsource'];
let gw;

before(async () => {
  gw = await startGateway('node-sockjs', {
    sockjs: { disconnect_delay_ms: '500' },
  });
});

after(async () => {
  if (gw) await gw.stop();
});

// Connects a STOMP client over SockJS with one forced transport.
function connect(transport) {
  let sock;
  const client = new Client({
    webSocketFactory: () => {
      sock = new SockJS(`${gw.url}/sockjs`, null, { transports: [transport] });
      return sock;
    },
    reconnectDelay: 0,
    heartbeatIncoming: 0,
    heartbeatOutgoing: 0,
  });
  const connected = new Promise((resolve, reject) => {
    client.onConnect = (frame) => resolve(frame);
    client.onStompError = (f) => reject(new Error(`STOMP ERROR ${f.headers.message}: ${f.body}`));
    client.onWebSocketClose = (e) => reject(new Error(`closed before CONNECTED: ${e.code} ${e.reason}`));
  });
  client.activate();
  return withTimeout(connected, 10000, `CONNECTED over ${transport}`).then((frame) => ({
    client,
    frame,
    transport: () => sock.transport,
  }));
}

// Subscribes with a receipt; resolves once the receipt arrived.
function subscribe(client, destination, onMessage) {
  const receipt = `r-${crypto.randomBytes(4).toString('hex')}`;
  const got = new Promise((resolve) => client.watchForReceipt(receipt, resolve));
  client.subscribe(destination, onMessage, { receipt });
  return withTimeout(got, 10000, `RECEIPT for SUBSCRIBE ${destination}`);
}

function inbox() {
  const messages = [];
  let waiters = [];
  return {
    push(m) {
      messages.push(m);
      waiters.forEach((w) => w());
      waiters = [];
    },
    async next(what) {
      const wait = async () => {
        while (messages.length === 0) await new Promise((r) => waiters.push(r));
        return messages.shift();
      };
      return withTimeout(wait(), 10000, what);
    },
  };
}

for (const transport of TRANSPORTS) {
  test(`STOMP over SockJS ${transport}: receipt, messages both ways, 30 KB, non-ASCII`, async () => {
    const a = await connect(transport);
    const b = await connect(transport);
    try {
      assert.equal(a.transport(), transport);
      assert.equal(b.transport(), transport);
      assert.equal(a.frame.headers.version, '1.2');
      const topic = `/topic/sockjs.${transport}.${crypto.randomBytes(4).toString('hex')}`;
      const inA = inbox();
      const inB = inbox();
      await subscribe(a.client, topic, (m) => inA.push(m));
      await subscribe(b.client, topic, (m) => inB.push(m));

      a.client.publish({ destination: topic, body: 'hello from a' });
      assert.equal((await inB.next('b gets a')).body, 'hello from a');
      assert.equal((await inA.next('a gets a')).body, 'hello from a');

      const text = 'héllo wörld, 日本語, emoji 🎉, \u2028 line sep, "quotes" \\ back';
      b.client.publish({ destination: topic, body: text });
      assert.equal((await inA.next('a gets b')).body, text);
      assert.equal((await inB.next('b gets b')).body, text);

      const big = 'x'.repeat(30 * 1024 - 10) + 'é日🎉end';
      a.client.publish({ destination: topic, body: big });
      const gotB = await inB.next('b gets 30 KB');
      assert.equal(gotB.body.length, big.length);
      assert.equal(gotB.body, big);
      assert.equal((await inA.next('a gets 30 KB')).body, big);
    } finally {
      await a.client.deactivate();
      await b.client.deactivate();
    }
  });
}

// The raw protocol, as a client that vanishes would leave it.
async function post(path, body = '') {
  const res = await fetch(`${gw.url}${path}`, { method: 'POST', body });
  return { status: res.status, text: await res.text() };
}

function activeSessions(metrics) {
  const line = metrics.split('\n').find((l) => l.startsWith('stomp_gateway_sessions_active'));
  return line ? Number(line.trim().split(' ').pop()) : NaN;
}

test('a vanished xhr-polling client is cleaned up after the disconnect delay', async () => {
  // The earlier tests' sessions close on their own time (deactivate does
  // not wait for the server): start from none.
  const settled = Date.now() + 10000;
  while (activeSessions(await gw.metrics()) !== 0) {
    assert.ok(Date.now() < settled, 'earlier sessions still open');
    await new Promise((r) => setTimeout(r, 50));
  }
  const before = 0;
  const session = `/sockjs/000/${crypto.randomBytes(8).toString('hex')}`;
  assert.deepEqual(await post(`${session}/xhr`), { status: 200, text: 'o\n' });
  const connect = 'CONNECT\naccept-version:1.2\nhost:/\nheart-beat:0,0\n\n\0';
  assert.equal((await post(`${session}/xhr_send`, JSON.stringify([connect]))).status, 204);
  const poll = await post(`${session}/xhr`);
  assert.match(poll.text, /^a\["CONNECTED\\n/);
  assert.equal(activeSessions(await gw.metrics()), before + 1);
  // The client stops polling: after the disconnect delay (500 ms here) the
  // session is gone, and so is its STOMP session.
  const deadline = Date.now() + 10000;
  for (;;) {
    const r = await post(`${session}/xhr_send`, '[]');
    if (r.status === 404) break;
    assert.ok(Date.now() < deadline, 'session never timed out');
    await new Promise((r) => setTimeout(r, 100));
  }
  for (;;) {
    if (activeSessions(await gw.metrics()) === before) break;
    assert.ok(Date.now() < deadline, 'STOMP session not closed');
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.match(await gw.metrics(), /sockjs_events_total\{event="disconnect_delay"[^}]*\} [1-9]/);
});

test('a second receiving connection is refused with 2010', async () => {
  const session = `/sockjs/000/${crypto.randomBytes(8).toString('hex')}`;
  const first = new AbortController();
  const res1 = await fetch(`${gw.url}${session}/xhr_streaming`, { method: 'POST', signal: first.signal });
  const reader = res1.body.getReader();
  let seen = '';
  while (!seen.includes('o\n')) seen += Buffer.from((await reader.read()).value).toString();
  const second = await fetch(`${gw.url}${session}/xhr_streaming`, { method: 'POST' });
  const body = await second.text();
  assert.ok(body.endsWith('c[2010,"Another connection still open"]\n'), body.slice(-80));
  first.abort();
  // The first stream was cut: its session now answers 1002.
  const deadline = Date.now() + 10000;
  for (;;) {
    const r = await post(`${session}/xhr`);
    if (r.text === 'c[1002,"Connection interrupted"]\n') break;
    assert.ok(Date.now() < deadline, `no 1002, last ${r.text}`);
    await new Promise((r) => setTimeout(r, 100));
  }
});
