#!/usr/bin/env node
// An independent client of ranking.v1.Ranker: it knows only the .proto (loaded at run time with
// @grpc/proto-loader), none of the Python code. Run by tests/serving/test_interop.py.
//
// Usage: node client.js <host:port> <path to ranker.proto> [request.json]
//
// The request is a RankRequest in the proto3 JSON mapping with the .proto's field names
// (int64 values as decimal strings), read from request.json or stdin. Prints one JSON object:
//   {"health": "SERVING", "code": "OK", "details": "", "response": {...RankResponse...}}
// where "health" is the grpc.health.v1 status of "ranking.v1.Ranker" and "code"/"details" the
// Rank call's status; "response" is null unless the code is OK. Exits 0 whenever both calls
// completed (whatever their status), 2 on a usage or local error.
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

async function main(argv) {
  if (argv.length < 2 || argv.length > 3) {
    process.stderr.write('usage: node client.js <host:port> <path to ranker.proto> [request.json]\n');
    return 2;
  }
  const [target, protoPath, requestPath] = argv;
  const request = JSON.parse(fs.readFileSync(requestPath || 0, 'utf8'));
  const ranking = load(protoPath).ranking.v1;
  const health = load(path.join(__dirname, 'health.proto')).grpc.health.v1;
  const credentials = grpc.credentials.createInsecure();
  const ranker = new ranking.Ranker(target, credentials);
  const checker = new health.Health(target, credentials);
  try {
    const checked = await unary(checker, 'Check', { service: 'ranking.v1.Ranker' });
    const ranked = await unary(ranker, 'Rank', request);
    const status = checked.response ? checked.response.status : checked.code;
    process.stdout.write(JSON.stringify({ health: status, ...ranked }) + '\n');
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
