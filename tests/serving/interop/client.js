#!/usr/bin/env node
// An independent client of ranking.v1.Ranker: it knows only the .proto (loaded at run time with
// @grpc/proto-loader), none of the Python code. Run by tests/serving/test_interop.py.
//
// Usage: node client.js [--format CANDIDATES|COLUMNS|BOTH] <host:port> <path to ranker.proto> [request.json]
//
// The request is a RankRequest in the proto3 JSON mapping with the .proto's field names
// (int64 values as decimal strings), read from request.json or stdin; --format sets its
// `response_format` (RESPONSE_FORMAT_<name>) over whatever the file says. Prints one JSON object:
//   {"health": "SERVING", "code": "OK", "details": "", "response": {...RankResponse...},
//    "rows": [{"item_id": "42", "index": 3, "score": 1.5, "objective_scores": {"click": 0.25, ...}}, ...]}
// where "health" is the grpc.health.v1 status of "ranking.v1.Ranker" and "code"/"details" the
// Rank call's status; "response" (as decoded) and "rows" (the ranking best first, read from
// `response.ranked` when set, else from `response.candidates`) are null unless the code is OK.
// Exits 0 whenever both calls completed (whatever their status), 2 on a usage or local error.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// Field names as in the .proto; 64-bit ints as strings (no precision loss); every field present.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const DEADLINE_MS = 10000;

function load(protoPath) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(protoPath, LOADER_OPTIONS));
}

const FORMATS = ['CANDIDATES', 'COLUMNS', 'BOTH'];

// The ranking of a RankResponse as rows, best first, whichever form it came in: the columns of
// `ranked` (set for RESPONSE_FORMAT_COLUMNS and _BOTH) or the `candidates` list (the v1 default).
function rankedRows(response) {
  const cols = response.ranked;
  if (!cols) {
    return response.candidates.map((c) => ({
      item_id: c.item_id, index: c.index, score: c.score, objective_scores: c.objective_scores,
    }));
  }
  const tasks = Object.keys(cols.objective_scores);
  const n = cols.item_ids.length;
  for (const [name, column] of [['index', cols.index], ['score', cols.score],
    ...tasks.map((t) => [`objective_scores['${t}']`, cols.objective_scores[t].values])]) {
    if (column.length !== n) throw new Error(`ranked.${name}: ${column.length} values, expected ${n}`);
  }
  return cols.item_ids.map((itemId, j) => ({
    item_id: itemId,
    index: cols.index[j],
    score: cols.score[j],
    objective_scores: Object.fromEntries(tasks.map((t) => [t, cols.objective_scores[t].values[j]])),
  }));
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

function unary(client, method, request) {
  const deadline = new Date(Date.now() + DEADLINE_MS);
  return new Promise((resolve) => {
    client[method](request, { deadline }, (err, response) => {
      if (err) resolve({ code: statusName(err.code), details: err.details || '', response: null });
      else resolve({ code: 'OK', details: '', response });
    });
  });
}

const USAGE = `usage: node client.js [--format ${FORMATS.join('|')}] <host:port> <path to ranker.proto> [request.json]\n`;

async function main(argv) {
  let format = null;
  if (argv[0] === '--format') {
    format = argv[1];
    argv = argv.slice(2);
  }
  if (argv.length < 2 || argv.length > 3 || (format !== null && !FORMATS.includes(format))) {
    process.stderr.write(USAGE);
    return 2;
  }
  const [target, protoPath, requestPath] = argv;
  const request = JSON.parse(fs.readFileSync(requestPath || 0, 'utf8'));
  if (format !== null) request.response_format = `RESPONSE_FORMAT_${format}`;
  const ranking = load(protoPath).ranking.v1;
  const health = load(path.join(__dirname, 'health.proto')).grpc.health.v1;
  const credentials = grpc.credentials.createInsecure();
  const ranker = new ranking.Ranker(target, credentials);
  const checker = new health.Health(target, credentials);
  try {
    const checked = await unary(checker, 'Check', { service: 'ranking.v1.Ranker' });
    const ranked = await unary(ranker, 'Rank', request);
    const status = checked.response ? checked.response.status : checked.code;
    const rows = ranked.response ? rankedRows(ranked.response) : null;
    process.stdout.write(JSON.stringify({ health: status, ...ranked, rows }) + '\n');
    return 0;
  } finally {
    ranker.close();
    checker.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => { process.stderr.write(`${err && err.stack ? err.stack : err}\n`); process.exitCode = 2; },
);
