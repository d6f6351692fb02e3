/**
 * Password hashing and password rules.
 *
 * Hashes are argon2id (@node-rs/argon2, a maintained native binding) with OWASP's minimum
 * parameters for it: 19 MiB of memory, 2 passes, 1 lane. They are stored in PHC form
 * (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`), which carries its parameters: raising them
 * later leaves old hashes verifiable.
 *
 * Passwords are normalised to Unicode NFKC before hashing and verifying, so the same password
 * typed on two keyboards (composed or decomposed accents, full-width digits) is the same password.
 */
import { randomBytes } from 'node:crypto';
import { hash, verify, type Algorithm, type Options } from '@node-rs/argon2';
import { COMMON_PASSWORDS } from './commonPasswords.js';

// Algorithm is a const enum in the binding's types; its runtime value for argon2id is 2.
const ARGON2ID = 2 as Algorithm;

export const ARGON2_PARAMS = { memoryCost: 19_456, timeCost: 2, parallelism: 1 } as const;
const OPTIONS: Options = { algorithm: ARGON2ID, ...ARGON2_PARAMS };

export const PASSWORD_MIN_LENGTH = 12;
export const PASSWORD_MAX_LENGTH = 128;
/** What a sign-in accepts at most (UTF-16 units): longer cannot be a valid password, and bounds the work. */
export const PASSWORD_INPUT_MAX_LENGTH = 1_024;

const normalise = (password: string): string => password.normalize('NFKC');

export function hashPassword(password: string): Promise<string> {
  return hash(normalise(password), OPTIONS);
}

// A hash of a random password with the same parameters: verifying against it costs what a real
// verification costs, so an unknown user cannot be told from a wrong password by the time taken.
let dummyHash: Promise<string> | undefined;
const dummy = () => (dummyHash ??= hash(randomBytes(32).toString('base64url'), OPTIONS));

/**
 * Whether `password` matches `storedHash`. Without a hash (no such user, no password set) it
 * verifies against a dummy hash anyway and answers false: always exactly one argon2 verification.
 */
export async function verifyPassword(storedHash: string | null, password: string): Promise<boolean> {
  const candidate = normalise(password);
  if (storedHash === null) {
    await verify(await dummy(), candidate).catch(() => false);
    return false;
  }
  try {
    return await verify(storedHash, candidate);
  } catch {
    // A stored value that is not a valid PHC string: it matches nothing.
    return false;
  }
}

/** Makes the dummy hash now (at start), so the first sign-in of an unknown user is not faster. */
export function warmPasswordHashing(): Promise<void> {
  return dummy().then(() => undefined);
}

// ---------------------------------------------------------------------------------------------
// Rules

const COMMON = new Set(COMMON_PASSWORDS.map((p) => p.toLowerCase()));

// The usual letter-for-digit swaps, undone before the list is consulted.
const LEET: Record<string, string> = { '@': 'a', '4': 'a', '8': 'b', '(': 'c', '3': 'e', '6': 'g', '1': 'i', '!': 'i', '0': 'o', '$': 's', '5': 's', '7': 't', '+': 't', '2': 'z' };
const unleet = (s: string) => [...s].map((c) => LEET[c] ?? c).join('');

// Keyboard rows and sequences. Two neighbouring characters are "linked" when they are equal or
// next to each other in one of these (either direction).
const WALKS = ['abcdefghijklmnopqrstuvwxyz', '01234567890', 'qwertyuiop', 'asdfghjkl', 'zxcvbnm', 'qwertzuiop', 'yxcvbnm', 'azertyuiop', 'qsdfghjklm', 'wxcvbn', '1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik9ol0p', 'qazwsxedcrfvtgbyhnujmikolp', '1q2w3e4r5t6y7u8i9o0p'];
const LINKS = new Set<string>();
for (const w of WALKS) {
  for (let i = 0; i + 1 < w.length; i++) LINKS.add(w[i]! + w[i + 1]!).add(w[i + 1]! + w[i]!);
}
const linked = (a: string, b: string) => a === b || LINKS.has(a + b);

/** The password is one short unit repeated ("abcabcabcabc", "passwordpassword"). */
function isRepetition(s: string): boolean {
  const chars = [...s];
  for (let unit = 1; unit <= chars.length / 2; unit++) {
    if (chars.length % unit !== 0) continue;
    if (chars.every((c, i) => c === chars[i % unit])) return true;
  }
  return false;
}

/**
 * The password is made of at most three runs along keyboard rows, the alphabet or the digits, or
 * of one character repeated ("qwerty123456", "abc123456789", "1qaz2wsx3edc", "aaaa1111bbbb").
 */
function isWalk(s: string): boolean {
  const chars = [...s];
  if (chars.length === 0) return false;
  const runs: number[] = [1];
  for (let i = 1; i < chars.length; i++) {
    if (linked(chars[i - 1]!, chars[i]!)) runs[runs.length - 1]!++;
    else runs.push(1);
  }
  return runs.length <= 3 && runs.every((n) => n >= 3);
}

const isPattern = (s: string) => isRepetition(s) || isWalk(s);

function isCommon(lower: string): boolean {
  for (const candidate of [lower, unleet(lower)]) {
    if (COMMON.has(candidate) || isPattern(candidate)) return true;
    // A common word with digits and symbols around it ("Password2024!", "!!monkey99"), unless
    // what surrounds it is long and patternless enough to stand on its own.
    const m = /^([^\p{L}]*)(.*?)([^\p{L}]*)$/u.exec(candidate);
    const [prefix, core, suffix] = [m?.[1] ?? '', m?.[2] ?? '', m?.[3] ?? ''];
    const affix = prefix + suffix;
    if (core !== '' && affix !== '' && (COMMON.has(core) || COMMON.has(unleet(core)) || isPattern(core))) {
      if ([...affix].length <= 6 || isPattern(affix) || isPattern(prefix) || isPattern(suffix)) return true;
    }
  }
  return false;
}

/**
 * Why `password` may not be used, in words fit for a 400 naming the field, or null when it may.
 * Lengths count code points (an emoji is one character). `email`: the user's, which the password
 * must not be (nor its local part).
 */
export function passwordProblem(password: string, email: string | null): string | null {
  if (/\p{Cs}/u.test(password)) return 'must be valid Unicode text';
  const normalised = normalise(password);
  const length = [...normalised].length;
  if (length < PASSWORD_MIN_LENGTH) return `must be at least ${PASSWORD_MIN_LENGTH} characters`;
  if (length > PASSWORD_MAX_LENGTH) return `must be at most ${PASSWORD_MAX_LENGTH} characters`;
  const lower = normalised.toLowerCase();
  if (email !== null) {
    const address = email.toLowerCase();
    const local = address.slice(0, address.lastIndexOf('@'));
    if (lower === address || lower === local) {
      return 'must not be your email address or its name part';
    }
  }
  if (isCommon(lower)) return 'is too common or too easy to guess: choose a longer, less predictable password';
  return null;
}
