// The README's chat client: @stomp/stompjs in Node against stomp-gateway and
// the example backend (examples/chat-backend). It joins a chat room, says
// hello, prints what the room says and the notifications sent to its user,
// and sends every line you type to the room.
//
//   npm i
//   JWT_SECRET=dev-only-secret node chat.mjs alice 42
//
// Environment: GATEWAY_URL (default ws://localhost:8080/ws); JWT_SECRET: sign
// a development token for the user (see token.mjs; leave it unset for a
// gateway with [auth] mode = "none", where every session is anonymous);
// CHAT_EXCHANGE (default adme.exchange, as in deploy/examples/chat.toml).
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';
import { createInterface } from 'node:readline';
import { devToken } from './token.mjs';

// stompjs needs a global WebSocket, which Node 20 does not have: use `ws`.
globalThis.WebSocket = WebSocket;

const [user = 'alice', roomId = '42'] = process.argv.slice(2);
const url = process.env.GATEWAY_URL ?? 'ws://localhost:8080/ws';
const exchange = process.env.CHAT_EXCHANGE ?? 'adme.exchange';
const secret = process.env.JWT_SECRET;

const client = new Client({
  brokerURL: url,
  connectHeaders: secret ? { Authorization: `Bearer ${devToken(user, secret)}` } : {},
  onConnect: (connected) => {
    console.log(`connected to ${url} as ${connected.headers['user-name'] ?? 'an anonymous session'}`);
    // The room: rooms are routing keys room.<id> on the topic exchange.
    client.subscribe(`/exchange/${exchange}/room.${roomId}`, (message) => {
      const chat = JSON.parse(message.body);
      console.log(`room ${chat.roomId}: ${chat.sender}: ${chat.content}`);
    });
    // Messages for this user, on every gateway (the publish API sends these).
    client.subscribe('/user/queue/notifications', (message) => {
      console.log(`notification: ${message.body}`);
    });
    say('hello');
  },
  onStompError: (frame) => console.error(`error: ${frame.headers.message} ${frame.body}`),
});

// The backend (chat-backend) receives this from the gateway over AMQP and
// publishes it to the room; with a JWT the sender is the token's user.
function say(content) {
  client.publish({
    destination: '/app/chat.sendMessage',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ roomId, sender: user, content, type: 'CHAT' }),
  });
}

client.activate();
createInterface({ input: process.stdin }).on('line', (line) => line.trim() && say(line.trim()));
process.on('SIGINT', () => client.deactivate().then(() => process.exit(0)));
