#!/usr/bin/env node
// growth_load.js -- the load side of bench/growth.py (run it through that).
//
// Opens N idle registered instances spread round robin over the idle roles
// i0..i{R-1}, then one "web" and K "users" instances, and drives request/reply
// at a fixed rate (open loop): "web" sends "ping" with a fresh activityId, a
// "users" instance answers "pong" on the same activity. The rate is fixed so
// that the broker's CPU per delivery is comparable across N and R.
//
//   NODE_PATH=bench/.work/node_modules node bench/growth_load.js \
//     --url ws://127.0.0.1:PORT/services --idle-roles R --instances N \
//     [--users K] [--rate 1000] [--seconds 10] [--warmup 3] [--pid BROKER_PID]
//
// Prints one JSON line: reply latency percentiles (us), replies, the broker's
// CPU time over the window (utime+stime from /proc/PID/stat) divided by the
// deliveries in it (2 per request), and its RSS.
'use strict';

const fs = require('fs');
const { sleep, nowS, uuid, configUrlOf, waitRegistered, Clients } = require('./wire_clients');

function parseArgs(argv) {
  const a = { url: null, idleRoles: 8, instances: 100, users: 1, rate: 1000, seconds: 10, warmup: 3, pid: null,
    connectBatch: 200, drain: 3 };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i];
    const v = () => argv[++i];
    switch (k) {
      case '--url': a.url = v(); break;
      case '--idle-roles': a.idleRoles = Number(v()); break;
      case '--instances': a.instances = Number(v()); break;
      case '--users': a.users = Number(v()); break;
      case '--rate': a.rate = Number(v()); break;
      case '--seconds': a.seconds = Number(v()); break;
      case '--warmup': a.warmup = Number(v()); break;
      case '--pid': a.pid = Number(v()); break;
      case '--connect-batch': a.connectBatch = Number(v()); break;
      default: throw new Error(`unknown argument ${k}`);
    }
  }
  if (!a.url) throw new Error('--url is required');
  a.configUrl = configUrlOf(a.url);
  return a;
}

const nowNs = () => process.hrtime.bigint();
const log = (...m) => process.stderr.write(m.join(' ') + '\n');

function procCpuS(pid) { // utime + stime in seconds (100 ticks per second)
  const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

function procRssKb(pid) {
  const m = fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/^VmRSS:\s+(\d+)/m);
  return m ? Number(m[1]) : null;
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

async function main() {
  const a = parseArgs(process.argv);
  const clients = new Clients(a.url, (role, e, errors) => { if (errors <= 3) log(`ws error (${role}): ${e.message}`); });
  const t0 = nowS();
  const idle = [];
  const expected = {};
  for (let i = 0; i < a.instances; i += a.connectBatch) {
    const n = Math.min(a.connectBatch, a.instances - i);
    const batch = await Promise.all(Array.from({ length: n }, (_, k) => {
      const role = `i${(i + k) % a.idleRoles}`;
      expected[role] = (expected[role] || 0) + 1;
      return clients.connect(role);
    }));
    idle.push(...batch);
  }
  const web = await clients.connect('web');
  const users = [];
  for (let k = 0; k < a.users; k++) users.push(await clients.connect('users'));
  expected.web = 1;
  expected.users = a.users;
  const registerS = await waitRegistered(a.configUrl, expected, { timeoutS: 120, pollMs: 100, requestTimeoutMs: 5000 });
  const connectS = nowS() - t0;
  const rssIdleKb = a.pid ? procRssKb(a.pid) : null;

  const pad = 'x'.repeat(60);
  const pending = new Map(); // activityId -> start ns
  let measuring = false;
  let counted = 0;
  let sentInWindow = 0;
  const lat = [];
  let unknown = 0;
  for (const u of users) {
    u.on('message', (data) => {
      const m = JSON.parse(data.toString());
      u.send('{"name":"pong","sender":"users","id":"' + uuid() + '","activityId":"' + m.activityId +
        '","payload":{"ok":true}}');
    });
  }
  web.on('message', (data) => {
    const t = nowNs();
    const m = JSON.parse(data.toString());
    const p = pending.get(m.activityId);
    if (p === undefined) { unknown++; return; }
    pending.delete(m.activityId);
    if (p.measured) { lat.push(Number(t - p.t) / 1000); counted++; }
  });
  let seq = 0;
  let sent = 0;
  function send() {
    const aid = uuid();
    seq++;
    pending.set(aid, { t: nowNs(), measured: measuring });
    if (measuring) sentInWindow++;
    web.send('{"name":"ping","sender":"web","id":"' + uuid() + '","activityId":"' + aid +
      '","payload":{"q":' + seq + ',"pad":"' + pad + '"}}');
    sent++;
  }
  // Open loop at a fixed rate: every millisecond, send what the schedule owes.
  let running = true;
  const start = nowS();
  const pump = () => {
    if (!running) return;
    const due = Math.floor((nowS() - start) * a.rate);
    while (sent < due) send();
    setTimeout(pump, 1);
  };
  pump();
  log('# load started'); // bench/growth.py attaches its profilers now
  await sleep(a.warmup * 1000);
  const cpu0 = a.pid ? procCpuS(a.pid) : null;
  const w0 = nowS();
  const wallStart = Date.now() / 1000;
  const lg0 = process.cpuUsage();
  measuring = true;
  await sleep(a.seconds * 1000);
  measuring = false;
  const windowS = nowS() - w0;
  const wallEnd = Date.now() / 1000;
  const cpu1 = a.pid ? procCpuS(a.pid) : null;
  const lgCpu = process.cpuUsage(lg0);
  running = false;
  const tDrain = nowS();
  while (pending.size > 0 && nowS() - tDrain < a.drain) await sleep(10);
  lat.sort((x, y) => x - y);
  const r = (x) => (x == null ? null : Math.round(x));
  const out = {
    instances: a.instances, idle_roles: a.idleRoles, users: a.users, rate: a.rate,
    connect_s: +connectS.toFixed(3), register_confirm_s: +registerS.toFixed(3),
    window_s: +windowS.toFixed(3), window_wall: [wallStart, wallEnd], sent_in_window: sentInWindow, replies: counted,
    req_per_s: Math.round(counted / windowS),
    p50_us: r(percentile(lat, 50)), p90_us: r(percentile(lat, 90)), p99_us: r(percentile(lat, 99)),
    p999_us: r(percentile(lat, 99.9)), max_us: r(lat[lat.length - 1]),
    lost: pending.size, unknown_replies: unknown,
    loadgen_cpu_pct: +(((lgCpu.user + lgCpu.system) / 1e6 / windowS) * 100).toFixed(1),
    ws_closed_unexpectedly: clients.closes, ws_errors: clients.errors,
  };
  if (a.pid) {
    out.broker_cpu_s = +(cpu1 - cpu0).toFixed(2);
    out.broker_cpu_pct = +(((cpu1 - cpu0) / windowS) * 100).toFixed(1);
    out.broker_cpu_us_per_delivery = +(((cpu1 - cpu0) * 1e6) / (2 * counted)).toFixed(2);
    out.broker_rss_idle_kb = rssIdleKb;
    out.broker_rss_kb = procRssKb(a.pid);
  }
  clients.stopping = true;
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(0);
}

main().catch((e) => { log('growth_load failed:', e && e.stack ? e.stack : e); process.exit(1); });
