// Heart-beats end to end (issue 10): @stomp/stompjs with heartbeatIncoming:
// 1000 gets the 1,000 ms it asked for (the gateway mirrors the client's wish,
// as RabbitMQ does) and detects a dead link within about 3 s. The link is
// killed by freezing a TCP proxy between the client and the gateway: nothing
// is closed, the bytes just stop, as when a network path dies.
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');

Object.assign(global, { WebSocket: require('ws') });
const { Client } = require('@stomp/stompjs');
const { startGateway, withTimeout } = require('../gateway-process');

/// A TCP proxy to `port` whose links can be frozen (no more bytes either way).
function freezableProxy(port) {
  const links = [];
  const server = net.createServer((client) => {
    const upstream = net.connect(port, '127.0.0.1');
    const link = { client, upstream, frozen: false };
    links.push(link);
    const forward = (from, to) =>
      from.on('data', (d) => {
        if (!link.frozen) to.write(d);
      });
    forward(client, upstream);
    forward(upstream, client);
    const end = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end);
    upstream.on('error', end);
    client.on('close', () => !link.frozen && upstream.destroy());
    upstream.on('close', () => !link.frozen && client.destroy());
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () =>
      resolve({
        port: server.address().port,
        freeze() {
          for (const l of links) l.frozen = true;
        },
        close() {
          for (const l of links) {
            l.client.destroy();
            l.upstream.destroy();
          }
          server.close();
        },
      }),
    );
  });
}

test('heartbeatIncoming 1000 is granted and a dead link is detected within ~3 s', async () => {
  const gw = await startGateway('node_heartbeat');
  const proxy = await freezableProxy(gw.port);
  let client;
  try {
    let closedAt = null;
    const closed = new Promise((resolve) => {
      client = new Client({
        brokerURL: `ws://127.0.0.1:${proxy.port}/ws`,
        heartbeatIncoming: 1000,
        heartbeatOutgoing: 1000,
        reconnectDelay: 0,
        // Give up on the socket at once when the heart-beats stop (the
        // close handshake cannot finish over a dead link).
        discardWebsocketOnCommFailure: true,
        onWebSocketClose: () => {
          closedAt = Date.now();
          resolve();
        },
      });
    });
    const connected = new Promise((resolve, reject) => {
      client.onConnect = resolve;
      client.onStompError = (f) => reject(new Error(`STOMP ERROR: ${f.headers.message}`));
    });
    client.activate();
    const frame = await withTimeout(connected, 10000, 'CONNECTED');
    // RabbitMQ's answer to heart-beat:1000,1000 is 1000,1000.
    assert.equal(frame.headers['heart-beat'], '1000,1000');
    // A healthy link stays up across several intervals.
    await new Promise((r) => setTimeout(r, 2500));
    assert.equal(closedAt, null, 'the link stays up while heart-beats flow');
    const frozenAt = Date.now();
    proxy.freeze();
    await withTimeout(closed, 10000, 'the client noticing the dead link');
    const took = closedAt - frozenAt;
    console.log(`dead link detected ${took} ms after the freeze`);
    assert.ok(took <= 3500, `dead link detected after ${took} ms`);
    // The gateway noticed too: the client stopped beating.
    const deadline = Date.now() + 5000;
    let metrics = '';
    while (Date.now() < deadline) {
      metrics = await gw.metrics();
      if (/sessions_closed_total\{reason="client_heartbeat_timeout"[^}]*\} 1/.test(metrics)) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.match(metrics, /sessions_closed_total\{reason="client_heartbeat_timeout"[^}]*\} 1/);
  } finally {
    if (client) await client.deactivate().catch(() => {});
    proxy.close();
    await gw.stop();
  }
});
