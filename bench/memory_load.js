#!/usr/bin/env node
// memory_load.js -- the throughput load of the shared exoload.js (P senders
// "web" send "ping" as fast as possible, each with at most W messages not yet
// seen by a receiver; C receivers "users" reply nothing), for a long run and
// with a choice of activity ids:
//
//   fresh  a new activityId per message (what exoload.js --scenario throughput sends)
//   pool   activityIds taken in turn from a fixed pool of --pool ids
//   none   no activityId at all
//
// Every message has a fresh `id` in all modes (as in exoload.js).
// Driven by bench/memory_curve.py; prints one JSON line per second on stdout
// ({"t": seconds since the load began, "sent", "delivered"}) and a last line
// with "done": true. Needs `ws`: NODE_PATH=bench/.work/node_modules (bench/run.sh
// or `npm ci` in bench/.work puts it there).
//
//   node memory_load.js --url ws://127.0.0.1:PORT/services --mode fresh --seconds 180
'use strict';

const { sleep, nowS, uuid, configUrlOf, waitRegistered, Clients } = require('./wire_clients');

function parseArgs(argv) {
  const a = { url: null, mode: 'fresh', pool: 1000, seconds: 180, senders: 4, receivers: 4, window: 32,
    payloadBytes: 100, drain: 3 };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i];
    const v = () => argv[++i];
    switch (k) {
      case '--url': a.url = v(); break;
      case '--mode': a.mode = v(); break;
      case '--pool': a.pool = Number(v()); break;
      case '--seconds': a.seconds = Number(v()); break;
      case '--senders': case '-P': a.senders = Number(v()); break;
      case '--receivers': case '-C': a.receivers = Number(v()); break;
      case '--window': case '-W': a.window = Number(v()); break;
      case '--payload-bytes': a.payloadBytes = Number(v()); break;
      default: throw new Error(`unknown argument ${k}`);
    }
  }
  if (!a.url) throw new Error('--url is required');
  if (!['fresh', 'pool', 'none'].includes(a.mode)) throw new Error(`unknown --mode ${a.mode}`);
  a.configUrl = configUrlOf(a.url);
  return a;
}

const say = (o) => process.stdout.write(JSON.stringify(o) + '\n');

async function main() {
  const a = parseArgs(process.argv);
  const clients = new Clients(a.url);
  const pad = 'x'.repeat(Math.max(0, a.payloadBytes - 40));
  const pool = a.mode === 'pool' ? Array.from({ length: a.pool }, uuid) : null;
  let next = 0;
  const activity = a.mode === 'fresh' ? () => ',"activityId":"' + uuid() + '"'
    : a.mode === 'pool' ? () => ',"activityId":"' + pool[(next = (next + 1) % pool.length)] + '"'
    : () => '';

  const senders = [];
  const receivers = [];
  for (let i = 0; i < a.senders; i++) senders.push({ ws: await clients.connect('web'), idx: i, out: 0 });
  for (let j = 0; j < a.receivers; j++) receivers.push(await clients.connect('users'));
  await waitRegistered(a.configUrl, { web: a.senders, users: a.receivers },
    { timeoutS: 10, pollMs: 20, requestTimeoutMs: 1000 });

  let sent = 0;
  let delivered = 0;
  let running = false;
  let flushScheduled = false;
  // At most `window` messages per sender are sent and not yet delivered: the
  // load is bounded, and the broker -- not a queue -- sets the pace.
  function pump(s) {
    if (!running || s.out >= a.window) return;
    const sock = s.ws._socket;
    if (sock) sock.cork();
    while (s.out < a.window) {
      s.ws.send('{"name":"ping","sender":"web","id":"' + uuid() + '"' + activity() +
        ',"payload":{"s":' + s.idx + ',"pad":"' + pad + '"}}');
      s.out++;
      sent++;
    }
    if (sock) sock.uncork();
  }
  function flush() {
    flushScheduled = false;
    for (const s of senders) pump(s);
  }
  const onMessage = (data) => {
    delivered++;
    const i = data.indexOf('"s":');  // the sender index, without parsing the whole frame
    const s = senders[parseInt(data.toString('latin1', i + 4, i + 8), 10)];
    if (s) s.out--;
    if (!flushScheduled) {
      flushScheduled = true;
      setImmediate(flush);
    }
  };
  for (const r of receivers) r.on('message', onMessage);

  const t0 = nowS();
  running = true;
  say({ t: 0, sent, delivered, started: true });
  flush();
  for (let k = 1; k <= a.seconds; k++) {
    await sleep(Math.max(0, (t0 + k - nowS()) * 1000));
    say({ t: +(nowS() - t0).toFixed(3), sent, delivered });
  }
  running = false;
  const tDrain = nowS();
  while (delivered < sent && nowS() - tDrain < a.drain) await sleep(10);
  clients.stopping = true;
  say({ t: +(nowS() - t0).toFixed(3), sent, delivered, lost: sent - delivered, done: true,
    closes: clients.closes, errors: clients.errors,
    loadgen_cpu_s: +((process.cpuUsage().user + process.cpuUsage().system) / 1e6).toFixed(2) });
  for (const ws of [...senders.map((s) => s.ws), ...receivers]) ws.terminate();
  process.exit(0);
}

main().catch((e) => {
  process.stderr.write(`memory_load.js: ${e.stack || e}\n`);
  process.exit(1);
});
