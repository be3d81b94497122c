// wire_clients.js -- what bench/memory_load.js and bench/growth_load.js share:
// registered WebSocket clients that speak only the wire protocol, and waiting
// until the broker's /config.json lists them. Needs `ws` on NODE_PATH
// (bench/.work/node_modules, which bench/run.sh sets up).
'use strict';

const http = require('http');
const crypto = require('crypto');
const WebSocket = require('ws');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const nowS = () => Number(process.hrtime.bigint()) / 1e9;
const uuid = () => crypto.randomUUID();

function configUrlOf(url) {
  const u = new URL(url);
  return `http://${u.hostname}:${u.port}/config.json`;
}

function getJson(url, timeoutMs) {
  return new Promise((resolve) => {
    const req = http.get(url, { timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => { try { resolve(JSON.parse(body)); } catch (e) { resolve(null); } });
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(null));
  });
}

// Until /config.json lists `expected` ({role: instances}); the seconds it took.
async function waitRegistered(configUrl, expected, { timeoutS, pollMs, requestTimeoutMs }) {
  const t0 = nowS();
  for (;;) {
    const cfg = await getJson(configUrl, requestTimeoutMs);
    const have = {};
    for (const c of (cfg && cfg.clients) || []) have[c.role] = c.instances;
    if (Object.entries(expected).every(([r, n]) => (have[r] || 0) === n)) return nowS() - t0;
    if (nowS() - t0 > timeoutS) throw new Error(`not registered after ${timeoutS} s: ${JSON.stringify(have)}`);
    await sleep(pollMs);
  }
}

// Registered connections, counting the errors and the closes that came before `stopping`.
class Clients {
  constructor(url, onError = () => {}) {
    this.url = url;
    this.onError = onError;
    this.stopping = false;
    this.closes = 0;
    this.errors = 0;
  }

  connect(role) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url, { perMessageDeflate: false });
      ws.on('open', () => {
        ws.send(JSON.stringify({ name: 'exocom.register-service', sender: role, id: uuid() }));
        resolve(ws);
      });
      ws.on('error', (e) => { this.errors++; this.onError(role, e, this.errors); reject(e); });
      ws.on('close', () => { if (!this.stopping) this.closes++; });
    });
  }
}

module.exports = { sleep, nowS, uuid, configUrlOf, getJson, waitRegistered, Clients };
