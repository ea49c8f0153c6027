// Compatibility test: @stomp/stompjs v7, the library browsers use, against the
// real stomp-gateway binary relaying to the local RabbitMQ.
//
// Run with `npm test` (after `cargo build -p stomp-gateway` and
// `scripts/rabbitmq-setup.sh`). The binary is found at
// $STOMP_GATEWAY_BIN, else <target>/debug/stomp-gateway where <target> is
// $CARGO_TARGET_DIR or the workspace's target/ directory.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

// As the stompjs docs show for Node: provide a global WebSocket.
Object.assign(global, { WebSocket: require('ws') });
const { Client } = require('@stomp/stompjs');

const { TARGET, freePort } = require('../lib');
const SUBPROTOCOLS = ['v12.stomp', 'v11.stomp', 'v10.stomp'];

function gatewayBinary() {
  const bin = process.env.STOMP_GATEWAY_BIN || path.join(TARGET, 'debug', 'stomp-gateway');
  if (!fs.existsSync(bin)) {
    throw new Error(`stomp-gateway binary not found at ${bin}: run \`cargo build -p stomp-gateway\` first`);
  }
  return bin;
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function waitReady(adminPort, child, ms) {
  const deadline = Date.now() + ms;
  let last = 'no answer';
  while (Date.now() < deadline) {
    if (child.exitCode !== null) {
      throw new Error(`stomp-gateway exited early with code ${child.exitCode}`);
    }
    try {
      const res = await fetch(`http://127.0.0.1:${adminPort}/readyz`);
      if (res.status === 200) return;
      last = `HTTP ${res.status}`;
    } catch (e) {
      last = String(e.cause || e);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`gateway not ready after ${ms} ms (last /readyz: ${last})`);
}

const suffix = crypto.randomBytes(6).toString('hex');
// The gateway declares its app and user exchanges at start: give this test
// its own and delete them afterwards, so runs leave nothing on the broker.
const OWN_EXCHANGES = [`e2e.node.app.${suffix}`, `e2e.node.user.${suffix}`];
let gateway;
let logPath;
let wsUrl;

before(async () => {
  const bin = gatewayBinary();
  const [port, adminPort] = [await freePort(), await freePort()];
  const logDir = path.join(TARGET, 'e2e-logs');
  fs.mkdirSync(logDir, { recursive: true });
  const configPath = path.join(logDir, `node-compat-${suffix}.toml`);
  logPath = path.join(logDir, `node-compat-${suffix}.log`);
  fs.writeFileSync(
    configPath,
    [
      '[server]',
      `listen = "127.0.0.1:${port}"`,
      `admin_listen = "127.0.0.1:${adminPort}"`,
      '',
      '[broker]',
      'mode = "relay"',
      'addresses = ["127.0.0.1:61613"]',
      '',
      '[app]',
      `exchange = "${OWN_EXCHANGES[0]}"`,
      '',
      '[user]',
      `exchange = "${OWN_EXCHANGES[1]}"`,
      '',
      '[log]',
      'filter = "debug"',
      '',
    ].join('\n'),
  );
  const log = fs.openSync(logPath, 'w');
  gateway = spawn(bin, ['--config', configPath], { stdio: ['ignore', log, log] });
  fs.closeSync(log);
  wsUrl = `ws://127.0.0.1:${port}/ws`;
  try {
    await waitReady(adminPort, gateway, 20000);
  } catch (e) {
    e.message += ` (gateway log: ${logPath})`;
    throw e;
  }
});

after(async () => {
  if (gateway && gateway.exitCode === null) gateway.kill('SIGKILL');
  const auth = 'Basic ' + Buffer.from('guest:guest').toString('base64');
  for (const name of OWN_EXCHANGES) {
    const r = await fetch(`http://127.0.0.1:15672/api/exchanges/%2F/${name}`, {
      method: 'DELETE',
      headers: { authorization: auth },
    });
    // 404: the gateway never got as far as declaring it.
    assert.ok(r.status === 204 || r.status === 404, `deleting exchange ${name}: HTTP ${r.status}`);
  }
});

test('@stomp/stompjs subscribes, publishes, receives and gets receipts through the gateway', async (t) => {
  const errors = [];
  const client = new Client({
    brokerURL: wsUrl,
    webSocketFactory: () => new WebSocket(wsUrl, SUBPROTOCOLS),
    connectHeaders: { login: 'browser-user', passcode: 'not-forwarded' },
    reconnectDelay: 0,
    heartbeatIncoming: 10000,
    heartbeatOutgoing: 10000,
    debug: () => {},
  });
  t.after(() => client.deactivate());

  const connected = new Promise((resolve, reject) => {
    client.onConnect = resolve;
    client.onStompError = (frame) => {
      errors.push(frame);
      reject(new Error(`STOMP ERROR: ${frame.headers.message} ${frame.body}`));
    };
    client.onWebSocketError = (ev) => reject(new Error(`WebSocket error: ${ev.message || ev}`));
  });
  client.activate();
  const connectedFrame = await withTimeout(connected, 10000, 'CONNECTED');
  assert.ok(['1.0', '1.1', '1.2'].includes(connectedFrame.headers.version), `version ${connectedFrame.headers.version}`);
  assert.equal(connectedFrame.headers.version, '1.2', 'stompjs offers 1.2 first, the gateway should pick it');

  const destination = `/topic/node-compat.${suffix}`;

  // SUBSCRIBE with a receipt: the RECEIPT means RabbitMQ has bound the queue.
  const subReceiptId = `sub-${suffix}`;
  const subReceipt = new Promise((resolve) => client.watchForReceipt(subReceiptId, resolve));
  const received = [];
  let onMessage;
  const firstMessage = new Promise((resolve) => {
    onMessage = resolve;
  });
  const subscription = client.subscribe(
    destination,
    (message) => {
      received.push(message);
      onMessage(message);
    },
    { receipt: subReceiptId },
  );
  const subReceiptFrame = await withTimeout(subReceipt, 10000, 'RECEIPT for SUBSCRIBE');
  assert.equal(subReceiptFrame.headers['receipt-id'], subReceiptId);

  // SEND with a receipt.
  const sendReceiptId = `send-${suffix}`;
  const sendReceipt = new Promise((resolve) => client.watchForReceipt(sendReceiptId, resolve));
  const body = `hello from stompjs ${suffix} — ünïcödé`;
  client.publish({
    destination,
    body,
    headers: { receipt: sendReceiptId, 'x-test': suffix },
  });
  const sendReceiptFrame = await withTimeout(sendReceipt, 10000, 'RECEIPT for SEND');
  assert.equal(sendReceiptFrame.headers['receipt-id'], sendReceiptId);

  const message = await withTimeout(firstMessage, 10000, 'MESSAGE');
  assert.equal(message.body, body);
  assert.equal(message.headers['x-test'], suffix);
  assert.equal(message.headers.destination, destination);
  assert.equal(message.headers.subscription, subscription.id);

  // A binary body round-trips byte-exact too.
  const binary = new Uint8Array([0, 1, 2, 0, 255, 254, 0, 42]);
  const secondMessage = new Promise((resolve) => {
    onMessage = resolve;
  });
  client.publish({ destination, binaryBody: binary });
  const binMessage = await withTimeout(secondMessage, 10000, 'binary MESSAGE');
  assert.deepEqual(Array.from(binMessage.binaryBody), Array.from(binary));

  subscription.unsubscribe();
  assert.equal(received.length, 2, 'exactly the two published messages arrive');
  assert.deepEqual(errors, []);
  await client.deactivate();
});
