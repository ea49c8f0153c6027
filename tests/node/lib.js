// Helpers shared by the Node tests in test/.
'use strict';

const net = require('node:net');
const path = require('node:path');

/** The repository root. */
const WORKSPACE = path.resolve(__dirname, '..', '..');
/** Cargo's target directory: $CARGO_TARGET_DIR or the workspace's target/. */
const TARGET = process.env.CARGO_TARGET_DIR
  ? path.resolve(WORKSPACE, process.env.CARGO_TARGET_DIR)
  : path.join(WORKSPACE, 'target');

/** A TCP port free on 127.0.0.1 right now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

module.exports = { WORKSPACE, TARGET, freePort };
