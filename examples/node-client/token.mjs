// Signs a development JWT (HS256) for a user name, as your login service
// would. The gateway checks it when it runs with
//   GATEWAY__AUTH__MODE=jwt GATEWAY__AUTH__JWT_SECRET=<the same secret>
//
//   JWT_SECRET=dev-only-secret node token.mjs alice     # prints the token
//
// Never use a development secret in production: there the secret (or an
// RS256/ES256 key pair) belongs to your identity provider.
import { createHmac } from 'node:crypto';
import { pathToFileURL } from 'node:url';

const base64url = (data) => Buffer.from(data).toString('base64url');

/** An HS256 token whose `sub` is `user`, valid for `ttlSeconds`. */
export function devToken(user, secret, ttlSeconds = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const claims = base64url(JSON.stringify({ sub: user, iat: now, exp: now + ttlSeconds }));
  const signature = createHmac('sha256', secret).update(`${header}.${claims}`).digest('base64url');
  return `${header}.${claims}.${signature}`;
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [user] = process.argv.slice(2);
  if (!user || !process.env.JWT_SECRET) {
    console.error('usage: JWT_SECRET=<secret> node token.mjs <user>');
    process.exit(2);
  }
  console.log(devToken(user, process.env.JWT_SECRET));
}
