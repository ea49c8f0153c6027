// Starts the real stomp-gateway binary with a generated config for the SockJS
// and browser tests (tests/node/test/sockjs.test.js, tests/browser/).
// The binary is $STOMP_GATEWAY_BIN, else <target>/debug/stomp-gateway.
// With E2E_FANOUT=per-session the config selects the per-session fan-out
// path ([fanout] topic/exchange/user = "per-session").
'use strict';

const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { TARGET, WORKSPACE, freePort } = require('./lib');

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

// TOML for `{section: {key: value}}`; values are TOML text.
function toml(sections) {
  const out = [];
  for (const [section, keys] of Object.entries(sections)) {
    out.push(`[${section}]`);
    for (const [k, v] of Object.entries(keys)) out.push(`${k} = ${v}`);
    out.push('');
  }
  return out.join('\n');
}

// Starts a gateway: `sections` adds to / overrides the defaults (TOML text
// values), `extra` is appended as is (`[[topology.exchanges]]` ...).
// Resolves to { url, port, adminUrl, logPath, metrics(), stop() }.
async function startGateway(name, sections = {}, extra = '') {
  const suffix = crypto.randomBytes(6).toString('hex');
  const [port, adminPort] = [await freePort(), await freePort()];
  const logDir = path.join(TARGET, 'e2e-logs');
  fs.mkdirSync(logDir, { recursive: true });
  const configPath = path.join(logDir, `${name}-${suffix}.toml`);
  const logPath = path.join(logDir, `${name}-${suffix}.log`);
  const own = [`e2e.node.app.${suffix}`, `e2e.node.user.${suffix}`];
  const base = {
    server: {
      listen: `"127.0.0.1:${port}"`,
      admin_listen: `"127.0.0.1:${adminPort}"`,
      endpoints: '[ { path = "/ws" }, { path = "/sockjs", sockjs = true } ]',
    },
    broker: { mode: '"relay"', addresses: '["127.0.0.1:61613"]' },
    app: { exchange: `"${own[0]}"` },
    user: { exchange: `"${own[1]}"` },
    log: { filter: '"info,stomp_gateway=debug"' },
  };
  // E2E_FANOUT=per-session (the second run in scripts/test.sh): each
  // session's own STOMP connection serves /topic, /exchange and /user
  // subscriptions instead of the pod's shared upstream.
  if (process.env.E2E_FANOUT === 'per-session') {
    base.fanout = { topic: '"per-session"', exchange: '"per-session"', user: '"per-session"' };
  }
  // The exchanges this launcher named itself (a test that sets its own
  // app or user exchange cleans that one up); deleted by stop().
  const owned = own.filter((_, i) => !(sections[['app', 'user'][i]] || {}).exchange);
  for (const [s, keys] of Object.entries(sections)) base[s] = { ...(base[s] || {}), ...keys };
  fs.writeFileSync(configPath, toml(base) + extra);
  const log = fs.openSync(logPath, 'w');
  const child = spawn(gatewayBinary(), ['--config', configPath], { stdio: ['ignore', log, log] });
  fs.closeSync(log);
  const adminUrl = `http://127.0.0.1:${adminPort}`;
  const deadline = Date.now() + 20000;
  let last = 'no answer';
  for (;;) {
    if (child.exitCode !== null) throw new Error(`stomp-gateway exited early (log ${logPath})`);
    try {
      const res = await fetch(`${adminUrl}/readyz`);
      if (res.status === 200) break;
      last = `HTTP ${res.status}`;
    } catch (e) {
      last = String(e.cause || e);
    }
    if (Date.now() > deadline) throw new Error(`gateway not ready (last /readyz: ${last}; log ${logPath})`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    adminUrl,
    logPath,
    async metrics() {
      return (await fetch(`${adminUrl}/metrics`)).text();
    },
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGKILL');
        await exited;
      }
      const auth = 'Basic ' + Buffer.from('guest:guest').toString('base64');
      for (const x of owned) {
        await fetch(`http://127.0.0.1:15672/api/exchanges/%2f/${encodeURIComponent(x)}`, {
          method: 'DELETE',
          headers: { authorization: auth },
        }).catch(() => {});
      }
    },
  };
}

module.exports = { startGateway, withTimeout, gatewayBinary, TARGET, WORKSPACE };
