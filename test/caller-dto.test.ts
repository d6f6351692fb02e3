import { describe, expect, it } from 'vitest';
import type { User } from '../src/models/user.model.js';
import { callerDto, toUserDto } from '../src/routes/schemas.js';

const user = (): User => ({
  id: '94732ceb-93e0-4df7-a6eb-de556209d64e',
  orgId: '1cf84b6f-bd32-4edf-b9bf-e545bb9908a6',
  email: 'a@example.com',
  name: 'A',
  role: 'member',
  createdAt: new Date('2026-01-02T03:04:05.678Z'),
  updatedAt: new Date('2026-02-03T04:05:06.789Z'),
});

describe('callerDto (GET /v1/me)', () => {
  it('is toUserDto, made once per user object while nothing changes', () => {
    const u = user();
    const first = callerDto(u);
    expect(first).toEqual(toUserDto(u));
    expect(callerDto(u)).toBe(first);
    expect(Object.isFrozen(first)).toBe(true);
    // Another object with the same values gets its own.
    expect(callerDto(user())).not.toBe(first);
  });

  it('follows a user object changed in place, every field and both dates', () => {
    const changes: ((u: User) => void)[] = [
      (u) => (u.id = 'e5f1c1d8-0000-4000-8000-000000000000'),
      (u) => (u.orgId = 'e5f1c1d8-0000-4000-8000-000000000001'),
      (u) => (u.email = 'b@example.com'),
      (u) => (u.name = null),
      (u) => (u.role = 'owner'),
      (u) => u.createdAt.setTime(0),
      (u) => (u.updatedAt = new Date('2027-01-01T00:00:00.000Z')),
    ];
    for (const change of changes) {
      const u = user();
      const before = callerDto(u);
      change(u);
      const after = callerDto(u);
      expect(after).not.toEqual(before);
      expect(after).toEqual(toUserDto(u));
    }
  });
});
