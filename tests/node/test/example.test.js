// The README's example, run as the README tells it: the real stomp-gateway
// started with deploy/examples/chat.toml (and the README's environment:
// JWT auth with a development secret, an API token), the example backend
// (chat-backend), and the client file examples/node-client/chat.mjs run
// by Node, three times: alice and bob in room 42, carol in room 7. Then the
// README's publish-API call for alice.
//
// Only the names differ from the README: the exchanges and queues get a
// random suffix (and are deleted afterwards) and the ports are free ones, so
// runs neither collide nor leave anything on the broker.
//
// Needs `cargo build --workspace --bins`, `scripts/rabbitmq-setup.sh` and
// `npm ci --prefix examples/node-client` (scripts/test.sh does all three).
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const { TARGET, WORKSPACE, freePort } = require('../lib');
const EXAMPLE = path.join(WORKSPACE, 'examples', 'node-client');
const CHAT_CONFIG = path.join(WORKSPACE, 'deploy', 'examples', 'chat.toml');
const WAIT_MS = 15000;
const MANAGEMENT = 'http://127.0.0.1:15672/api';
const MANAGEMENT_AUTH = 'Basic ' + Buffer.from('guest:guest').toString('base64');

// What the README sets in the gateway's environment.
const JWT_SECRET = 'dev-only-secret';
const API_TOKEN = 'dev-api-token';

const suffix = crypto.randomBytes(6).toString('hex');
const names = {
  chatExchange: `adme.exchange.${suffix}`,
  chatQueue: `adme.queue.${suffix}`,
  backendQueue: `chat.backend.${suffix}`,
  appExchange: `stomp.app.${suffix}`,
  userExchange: `stomp.user.${suffix}`,
};
const logDir = path.join(TARGET, 'e2e-logs');
const processes = [];
let wsUrl;
let adminUrl;

function binary(name) {
  const bin = path.join(TARGET, 'debug', name);
  if (!fs.existsSync(bin)) {
    throw new Error(`${name} not found at ${bin}: run \`cargo build --workspace --bins\` first`);
  }
  return bin;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `check` (async, truthy when done) until it holds or `ms` passed. */
async function until(what, ms, check) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      if (await check()) return;
    } catch (e) {
      last = e;
    }
    await sleep(100);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? ` (last error: ${last})` : ''}`);
}

/** A child process whose output is collected line by line. */
class Proc {
  constructor(label, command, args, options) {
    this.label = label;
    this.lines = [];
    this.child = spawn(command, args, { ...options, stdio: ['pipe', 'pipe', 'pipe'] });
    this.logPath = path.join(logDir, `readme-example-${suffix}-${label}.log`);
    const log = fs.createWriteStream(this.logPath);
    let partial = '';
    const collect = (chunk) => {
      log.write(chunk);
      partial += chunk.toString('utf8');
      const parts = partial.split('\n');
      partial = parts.pop();
      this.lines.push(...parts);
    };
    this.child.stdout.on('data', collect);
    this.child.stderr.on('data', collect);
    processes.push(this);
  }

  async waitFor(line) {
    await until(`${this.label} to print ${JSON.stringify(line)} (log: ${this.logPath})`, WAIT_MS, () => {
      if (this.child.exitCode !== null) {
        throw new Error(`${this.label} exited with ${this.child.exitCode}: ${this.lines.join(' | ')}`);
      }
      return this.lines.includes(line);
    });
  }

  type(line) {
    this.child.stdin.write(`${line}\n`);
  }
}

/** The README's client: `node chat.mjs <user> <room>` with its environment. */
function chatClient(user, room) {
  return new Proc(`${user}-${room}`, process.execPath, ['chat.mjs', user, room], {
    cwd: EXAMPLE,
    env: { ...process.env, GATEWAY_URL: wsUrl, CHAT_EXCHANGE: names.chatExchange, JWT_SECRET },
  });
}

async function management(method, urlPath) {
  return fetch(`${MANAGEMENT}${urlPath}`, { method, headers: { authorization: MANAGEMENT_AUTH } });
}

/** Bindings from `exchange` with this routing key (queues of subscriptions). */
async function bindingCount(exchange, routingKey) {
  const r = await management('GET', `/exchanges/%2F/${encodeURIComponent(exchange)}/bindings/source`);
  if (r.status !== 200) return 0;
  return (await r.json()).filter((b) => b.routing_key === routingKey).length;
}

before(async () => {
  if (!fs.existsSync(path.join(EXAMPLE, 'node_modules', '@stomp', 'stompjs'))) {
    throw new Error('run `npm ci --prefix examples/node-client` first');
  }
  fs.mkdirSync(logDir, { recursive: true });
  const [port, adminPort] = [await freePort(), await freePort()];
  // deploy/examples/chat.toml with this run's names and ports.
  let config = fs.readFileSync(CHAT_CONFIG, 'utf8');
  config = config
    .replaceAll('"adme.exchange"', `"${names.chatExchange}"`)
    .replaceAll('"adme.queue"', `"${names.chatQueue}"`)
    .replaceAll('"chat.backend"', `"${names.backendQueue}"`)
    .replaceAll('"stomp.app"', `"${names.appExchange}"`)
    .replaceAll('"stomp.user"', `"${names.userExchange}"`)
    .replace('"0.0.0.0:8080"', `"127.0.0.1:${port}"`)
    .replace('"0.0.0.0:9090"', `"127.0.0.1:${adminPort}"`);
  for (const name of Object.values(names)) {
    assert.ok(config.includes(`"${name}"`), `chat.toml no longer names ${name.replace(/\.[0-9a-f]+$/, '')}`);
  }
  const configPath = path.join(logDir, `readme-example-${suffix}.toml`);
  fs.writeFileSync(configPath, config);
  wsUrl = `ws://127.0.0.1:${port}/ws`;
  adminUrl = `http://127.0.0.1:${adminPort}`;

  const gateway = new Proc('gateway', binary('stomp-gateway'), ['--config', configPath], {
    env: {
      ...process.env,
      GATEWAY__AUTH__MODE: 'jwt',
      GATEWAY__AUTH__JWT_SECRET: JWT_SECRET,
      GATEWAY__API__TOKEN: API_TOKEN,
      GATEWAY__SERVER__DRAIN_PERIOD_MS: '0',
    },
  });
  await until(`the gateway to be ready (log: ${gateway.logPath})`, 20000, async () => {
    if (gateway.child.exitCode !== null) throw new Error(`gateway exited with ${gateway.child.exitCode}`);
    return (await fetch(`${adminUrl}/readyz`)).status === 200;
  });
  const backend = new Proc(
    'backend',
    binary('chat-backend'),
    ['--app-exchange', names.appExchange, '--queue', names.backendQueue, '--chat-exchange', names.chatExchange],
    { env: { ...process.env, RUST_LOG: 'info' } },
  );
  await until(`chat-backend to consume (log: ${backend.logPath})`, 20000, () =>
    backend.lines.some((l) => l.includes('consuming')),
  );
});

after(async () => {
  for (const p of processes) {
    if (p.child.exitCode === null) p.child.kill('SIGKILL');
  }
  // What the example declares, as the README's clean-up commands delete it.
  for (const queue of [names.chatQueue, names.backendQueue]) {
    const r = await management('DELETE', `/queues/%2F/${queue}`);
    assert.ok([204, 404].includes(r.status), `deleting queue ${queue}: HTTP ${r.status}`);
  }
  for (const exchange of [names.chatExchange, names.appExchange, names.userExchange]) {
    const r = await management('DELETE', `/exchanges/%2F/${exchange}`);
    assert.ok([204, 404].includes(r.status), `deleting exchange ${exchange}: HTTP ${r.status}`);
  }
});

/** An in-process @stomp/stompjs client for `user`, connected. */
async function stompClient(user) {
  const { Client } = require('@stomp/stompjs');
  const { devToken } = await import(path.join(EXAMPLE, 'token.mjs'));
  globalThis.WebSocket ??= require('ws');
  const client = new Client({
    brokerURL: wsUrl,
    connectHeaders: { Authorization: `Bearer ${devToken(user, JWT_SECRET)}` },
    reconnectDelay: 0,
    debug: () => {},
  });
  return client;
}

// The issue's race, 50 times in a row on each path: SUBSCRIBE, then at once
// (in the same onConnect, as the README's client and most stompjs code do)
// a SEND whose message comes back to that subscription. Through the relay
// the SEND shares the session's broker connection with the SUBSCRIBE;
// through /app it goes over AMQP, and the gateway holds it until RabbitMQ
// confirmed the SUBSCRIBE. Every run must receive its own message.
const RUNS = 50;
for (const via of ['relay', 'app']) {
  test(`subscribe then publish in one onConnect, ${RUNS} times via ${via}: every run gets its own message`, async () => {
    const missed = [];
    for (let i = 0; i < RUNS; i++) {
      const room = `c${via}${i}`;
      const content = `hello ${via} ${i} ${suffix}`;
      const client = await stompClient('causal');
      const got = new Promise((resolve, reject) => {
        client.onConnect = () => {
          client.subscribe(`/exchange/${names.chatExchange}/room.${room}`, (m) => {
            if (JSON.parse(m.body).content === content) resolve();
          });
          const body = JSON.stringify({ roomId: room, sender: 'causal', content, type: 'CHAT' });
          client.publish(
            via === 'relay'
              ? { destination: `/exchange/${names.chatExchange}/room.${room}`, body }
              : { destination: '/app/chat.sendMessage', headers: { 'content-type': 'application/json' }, body },
          );
        };
        client.onStompError = (f) => reject(new Error(`STOMP ERROR: ${f.headers.message} ${f.body}`));
      });
      client.activate();
      // A message that would arrive at all arrives within milliseconds; a
      // lost one never does.
      const timer = new Promise((resolve) => setTimeout(() => resolve('missed'), 3000).unref());
      if ((await Promise.race([got, timer])) === 'missed') missed.push(i);
      await client.deactivate();
    }
    assert.deepEqual(missed, [], `runs that missed their own message via ${via}`);
  });
}

test('the README example: rooms, the backend, and the publish API for alice', async () => {
  const alice = chatClient('alice', '42');
  const bob = chatClient('bob', '42');
  const carol = chatClient('carol', '7');
  await alice.waitFor(`connected to ${wsUrl} as alice`);
  await bob.waitFor(`connected to ${wsUrl} as bob`);
  await carol.waitFor(`connected to ${wsUrl} as carol`);
  // Every subscription is bound in RabbitMQ (room 42 twice per-session, once
  // for the gateway's shared queue; room 7 once; alice's notifications), so
  // what follows cannot race a SUBSCRIBE.
  const room42 = process.env.E2E_FANOUT === 'per-session' ? 2 : 1;
  await until('the room subscriptions to be bound', WAIT_MS, async () =>
    (await bindingCount(names.chatExchange, 'room.42')) === room42 &&
    (await bindingCount(names.chatExchange, 'room.7')) === 1 &&
    (await bindingCount(names.userExchange, 'alice.queue.notifications')) === 1,
  );

  // Each client's hello (published right after its SUBSCRIBE) reached it.
  await alice.waitFor('room 42: alice: hello');
  await bob.waitFor('room 42: bob: hello');
  await carol.waitFor('room 7: carol: hello');

  // Two clients in room 42 see each other.
  alice.type('hi bob');
  await bob.waitFor('room 42: alice: hi bob');
  await alice.waitFor('room 42: alice: hi bob');
  bob.type('hi alice');
  await alice.waitFor('room 42: bob: hi alice');
  await bob.waitFor('room 42: bob: hi alice');

  // Room 7 sees none of it: carol's own message arrives, nothing of room 42.
  carol.type('room 7 only');
  await carol.waitFor('room 7: carol: room 7 only');

  // The README's publish-API call reaches alice (and nobody else).
  const r = await fetch(`${adminUrl}/api/v1/users/alice/messages`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${API_TOKEN}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ destination: '/queue/notifications', body: 'you have mail' }),
  });
  assert.equal(r.status, 202, await r.text());
  await alice.waitFor('notification: you have mail');

  // Give a stray delivery the time a real one took, then look at everything.
  await sleep(500);
  for (const p of [alice, bob, carol]) {
    assert.deepEqual(
      p.lines.filter((l) => l.startsWith('error')),
      [],
      `${p.label} printed errors`,
    );
  }
  assert.deepEqual(carol.lines.filter((l) => l.startsWith('room 42')), [], 'carol (room 7) saw room 42');
  for (const p of [alice, bob]) {
    assert.deepEqual(p.lines.filter((l) => l.startsWith('room 7')), [], `${p.label} saw room 7`);
  }
  assert.deepEqual(bob.lines.filter((l) => l.startsWith('notification')), [], 'bob got alice\'s notification');
  assert.deepEqual(carol.lines.filter((l) => l.startsWith('notification')), [], 'carol got alice\'s notification');
});
