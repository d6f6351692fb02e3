#!/usr/bin/env bash
#
# Multi-tenant walkthrough against a RUNNING server, using the seeded
# development data (orgs Acme Corp and Tech Startup and their users).
#
# Usage:
#   ./test-multi-tenant.sh                           # http://localhost:3000
#   BASE_URL=http://127.0.0.1:3999 ./test-multi-tenant.sh
#
# Environment:
#   BASE_URL      server to test (default: http://localhost:3000)
#   WAIT_SECONDS  how long to wait for GET /health to answer 200 before
#                 starting (default: 30), so CI can start the server and run
#                 this script right away
#
# Needs only curl and node (JSON is checked with node, no jq).
# Prints PASS/FAIL per check; exits 1 if any check fails or the server does
# not answer.
set -euo pipefail

BASE_URL=${BASE_URL:-http://localhost:3000}
BASE_URL=${BASE_URL%/}
WAIT_SECONDS=${WAIT_SECONDS:-30}

# Seeded ids (see the development seed data).
ACME_ORG=00000000-0000-0000-0000-000000000001
TECH_ORG=00000000-0000-0000-0000-000000000002
ACME_ADMIN=00000000-0000-0000-0001-000000000001  # admin@acme.com, role admin
# 00000000-0000-0000-0001-000000000002 is user@acme.com (role member).
TECH_FOUNDER=00000000-0000-0000-0002-000000000001 # founder@techstartup.com, role owner

AS_ACME_ADMIN=(-H "x-org-id: $ACME_ORG" -H "x-user-id: $ACME_ADMIN")

for tool in curl node; do
  command -v "$tool" >/dev/null 2>&1 || { echo "FAIL  required tool not found: $tool" >&2; exit 1; }
done
[[ $WAIT_SECONDS =~ ^[0-9]+$ ]] || { echo "FAIL  WAIT_SECONDS must be a whole number, got '$WAIT_SECONDS'" >&2; exit 1; }

TMP_DIR=$(mktemp -d)
trap 'rm -rf "$TMP_DIR"' EXIT

PASSED=0
FAILED=0

# --- helpers -----------------------------------------------------------------

# request METHOD PATH [curl args...]
# Sets STATUS (HTTP code, "000" if there was no answer), BODY and HEADERS
# (raw response headers).
request() {
  local method=$1 path=$2
  shift 2
  : >"$TMP_DIR/body"
  : >"$TMP_DIR/headers"
  STATUS=$(curl -sS -X "$method" -o "$TMP_DIR/body" -D "$TMP_DIR/headers" -w '%{http_code}' \
    --connect-timeout 3 --max-time 10 "$@" "$BASE_URL$path" 2>"$TMP_DIR/curl-error") || true
  BODY=$(<"$TMP_DIR/body")
  HEADERS=$(<"$TMP_DIR/headers")
  if [[ $STATUS == 000 ]]; then
    BODY="<no response: $(tr -d '\n' <"$TMP_DIR/curl-error")>"
  fi
}

# header NAME: value of a response header of the last request (case-
# insensitive name, trailing CR removed), empty if absent.
header() {
  printf '%s\n' "$HEADERS" | tr -d '\r' | awk -v name="$1" '
    { i = index($0, ":") }
    i > 0 && tolower(substr($0, 1, i - 1)) == tolower(name) {
      v = substr($0, i + 1); sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
    }
    END { print v }'
}

# json EXPR: evaluates the JavaScript expression EXPR with `b` bound to the
# parsed body of the last response. Strings print as-is, anything else as
# JSON; problems print as <...> so they show up in FAIL messages.
json() {
  BODY_JSON=$BODY node -e '
    let b;
    try { b = JSON.parse(process.env.BODY_JSON); }
    catch { process.stdout.write("<body is not JSON>"); process.exit(0); }
    let r;
    try { r = new Function("b", "return (" + process.argv[1] + ");")(b); }
    catch (e) { process.stdout.write("<" + e.message + ">"); process.exit(0); }
    process.stdout.write(r === undefined ? "<missing>" : typeof r === "string" ? r : JSON.stringify(r));
  ' "$1"
}

pass() {
  PASSED=$((PASSED + 1))
  printf 'PASS  %s (%s)\n' "$1" "$2"
}

# fail NAME EXPECTED GOT: also shows the status and body of the last
# response, which is usually what explains the failure.
fail() {
  FAILED=$((FAILED + 1))
  printf 'FAIL  %s\n      expected: %s\n      got:      %s\n      response: HTTP %s %s\n' \
    "$1" "$2" "$3" "$STATUS" "$(printf '%s' "$BODY" | head -c 300)"
}

# check_eq NAME EXPECTED GOT
check_eq() {
  if [[ $3 == "$2" ]]; then pass "$1" "$3"; else fail "$1" "$2" "$3"; fi
}

# check_status NAME EXPECTED_CODE
check_status() {
  check_eq "$1" "HTTP $2" "HTTP $STATUS"
}

# check_present NAME GOT: GOT must be a real value (not missing/null/empty).
check_present() {
  case $2 in
    '' | null | '<'*'>') fail "$1" "a value" "${2:-<empty>}" ;;
    *) pass "$1" "$2" ;;
  esac
}

# check_contains NAME NEEDLE LIST / check_lacks NAME NEEDLE LIST
# LIST is a JSON array of strings as printed by `json`.
check_contains() {
  if [[ $3 == *"\"$2\""* ]]; then pass "$1" "$3"; else fail "$1" "list containing $2" "$3"; fi
}
check_lacks() {
  if [[ $3 == '['*']' && $3 != *"\"$2\""* ]]; then pass "$1" "$3"; else fail "$1" "list without $2" "$3"; fi
}

section() { printf '\n== %s\n' "$*"; }

# --- wait for the server -----------------------------------------------------

printf 'Testing %s (waiting up to %ss for GET /health)\n' "$BASE_URL" "$WAIT_SECONDS"
deadline=$((SECONDS + WAIT_SECONDS))
while :; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --connect-timeout 1 --max-time 3 "$BASE_URL/health") || true
  [[ $code == 200 ]] && break
  if ((SECONDS >= deadline)); then
    if [[ $code == 000 ]]; then
      printf 'FAIL  server at %s did not answer GET /health within %ss (is it running? check BASE_URL)\n' \
        "$BASE_URL" "$WAIT_SECONDS"
      exit 1
    fi
    # It answers, just not 200: run the checks, they show what is wrong.
    printf 'WARN  GET /health still answers HTTP %s after %ss; running the checks anyway\n' "$code" "$WAIT_SECONDS"
    break
  fi
  sleep 1
done

# --- a) health without tenant headers ----------------------------------------

section "a) GET /health without headers"
request GET /health
check_status "a) GET /health" 200
check_eq "a) body.status" ok "$(json 'b.status')"
check_eq "a) body.database" connected "$(json 'b.database')"
check_present "a) body.env present" "$(json 'b.env')"
check_present "a) body.timestamp present" "$(json 'b.timestamp')"
request_id=$(json 'b.requestId')
check_present "a) body.requestId present" "$request_id"
check_eq "a) no org/user fields without tenant headers" "[]" \
  "$(json 'Object.keys(b).filter((k) => /^(org|user)/i.test(k))')"
check_eq "a) x-request-id header equals body.requestId" "$request_id" "$(header x-request-id)"

# --- b) health with tenant headers -------------------------------------------

section "b) GET /health as Acme admin"
request GET /health "${AS_ACME_ADMIN[@]}"
check_status "b) GET /health as Acme admin" 200
check_eq "b) body.org" "$ACME_ORG" "$(json 'b.org')"
check_eq "b) body.user.id" "$ACME_ADMIN" "$(json 'b.user?.id')"
check_eq "b) body.user.email" admin@acme.com "$(json 'b.user?.email')"
check_eq "b) body.user.role" admin "$(json 'b.user?.role')"

# --- c) user does not belong to the org --------------------------------------

section "c) GET /health as Acme admin claiming Tech Startup"
request GET /health -H "x-org-id: $TECH_ORG" -H "x-user-id: $ACME_ADMIN"
check_status "c) Acme admin with Tech Startup org" 403
check_eq "c) body.error" Forbidden "$(json 'b.error')"
check_eq "c) body.message" "User does not belong to specified organization" "$(json 'b.message')"

# --- d) tenant-scoped reads ----------------------------------------------------

section "d) /v1/me and /v1/users as Acme admin"
request GET /v1/me "${AS_ACME_ADMIN[@]}"
check_status "d) GET /v1/me" 200
# Accept the user at the top level or wrapped in "data"/"user".
check_eq "d) /v1/me email" admin@acme.com "$(json 'b.email ?? b.data?.email ?? b.user?.email')"

request GET /v1/users "${AS_ACME_ADMIN[@]}"
check_status "d) GET /v1/users" 200
check_eq "d) /v1/users has data array and nextCursor" true \
  "$(json 'Array.isArray(b.data) && "nextCursor" in b')"
emails=$(json 'b.data.map((u) => u.email)')
check_contains "d) /v1/users lists admin@acme.com" admin@acme.com "$emails"
check_contains "d) /v1/users lists user@acme.com" user@acme.com "$emails"
check_lacks "d) /v1/users hides founder@techstartup.com" founder@techstartup.com "$emails"

# --- e) another tenant's object ------------------------------------------------

section "e) GET /v1/users/<Tech Startup founder> as Acme admin"
request GET "/v1/users/$TECH_FOUNDER" "${AS_ACME_ADMIN[@]}"
check_status "e) other tenant's user" 404

# --- f) missing tenant headers ---------------------------------------------------

section "f) /v1/me without complete tenant headers"
request GET /v1/me
check_status "f) GET /v1/me without headers" 401
request GET /v1/me -H "x-org-id: $ACME_ORG"
check_status "f) GET /v1/me with only x-org-id" 400

# --- g) the audit log ---------------------------------------------------------------

section "g) GET /v1/audit-logs"
request GET "/v1/audit-logs?limit=5" "${AS_ACME_ADMIN[@]}"
check_status "g) GET /v1/audit-logs as Acme admin" 200
check_eq "g) entries of Acme only, newest first" true \
  "$(json 'Array.isArray(b.data) && b.data.every((e, i, a) => i === 0 || a[i - 1].seq > e.seq) && "nextCursor" in b')"
request GET /v1/audit-logs -H "x-org-id: $ACME_ORG" -H "x-user-id: 00000000-0000-0000-0001-000000000002"
check_status "g) GET /v1/audit-logs as Acme member" 403

# --- h) an API key ------------------------------------------------------------------

section "h) API keys: create as Acme admin, call with Bearer, revoke"
request POST /v1/api-keys "${AS_ACME_ADMIN[@]}" -H 'content-type: application/json' \
  -d '{"name":"walkthrough key","role":"member"}'
check_status "h) POST /v1/api-keys as Acme admin" 201
KEY_SECRET=$(json 'b.secret')
KEY_ID=$(json 'b.id')
check_eq "h) the secret is llmk_ + 43 base62 characters" true "$(json '/^llmk_[0-9A-Za-z]{43}$/.test(b.secret)')"
check_eq "h) the key is Acme's, role member" "$ACME_ORG member" "$(json 'b.orgId + " " + b.role')"
AS_KEY=(-H "Authorization: Bearer $KEY_SECRET")
request GET /v1/me "${AS_KEY[@]}"
check_status "h) GET /v1/me with the key" 200
check_eq "h) /v1/me is the key" "api_key $KEY_ID $ACME_ORG" "$(json 'b.type + " " + b.id + " " + b.orgId')"
request GET "/v1/users/$TECH_FOUNDER" "${AS_KEY[@]}"
check_status "h) other tenant's user with the key" 404
request GET "/v1/api-keys?limit=100" "${AS_ACME_ADMIN[@]}"
check_status "h) GET /v1/api-keys as Acme admin" 200
check_eq "h) the list shows the key without its secret" true \
  "$(json "b.data.some((k) => k.id === '$KEY_ID') && !JSON.stringify(b).includes('$KEY_SECRET'.slice(12))")"
request DELETE "/v1/api-keys/$KEY_ID" "${AS_ACME_ADMIN[@]}"
check_status "h) DELETE /v1/api-keys/<id> revokes it" 204
request GET /v1/me "${AS_KEY[@]}"
check_status "h) the revoked key" 401

# --- i) password sign-in and sessions --------------------------------------------

section "i) POST /v1/auth/login, refresh, logout"
login_body='{"orgSlug":"acme-corp","email":"admin@acme.com","password":"acme-admin-dev-password"}'
request POST /v1/auth/login -H 'content-type: application/json' -d "$login_body"
check_status "i) login with the development password" 200
ACCESS=$(json 'b.accessToken')
REFRESH=$(json 'b.refreshToken')
check_eq "i) tokenType" Bearer "$(json 'b.tokenType')"
check_eq "i) refresh token format" true "$(json '/^llmr_[0-9A-Za-z]{43}$/.test(b.refreshToken)')"

request GET /v1/me -H "Authorization: Bearer $ACCESS"
check_status "i) GET /v1/me with the access token" 200
check_eq "i) /v1/me as admin@acme.com" admin@acme.com "$(json 'b.email')"

request POST /v1/auth/refresh -H 'content-type: application/json' -d "{\"refreshToken\":\"$REFRESH\"}"
check_status "i) refresh" 200
ACCESS2=$(json 'b.accessToken')
REFRESH2=$(json 'b.refreshToken')
check_eq "i) a new refresh token" true "$([[ $REFRESH2 != "$REFRESH" ]] && echo true || echo false)"

request POST /v1/auth/logout -H 'content-type: application/json' -d "{\"refreshToken\":\"$REFRESH2\"}"
check_status "i) logout" 204
request GET /v1/me -H "Authorization: Bearer $ACCESS2"
check_status "i) the access token after logout" 401

request POST /v1/auth/login -H 'content-type: application/json' \
  -d '{"orgSlug":"acme-corp","email":"nobody@acme.com","password":"not-a-password-at-all"}'
check_status "i) login with an unknown email" 401

# --- summary -------------------------------------------------------------------

printf '\n%d passed, %d failed\n' "$PASSED" "$FAILED"
((FAILED == 0))
