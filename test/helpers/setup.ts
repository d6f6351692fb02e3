import { afterAll } from 'vitest';
import { closeTestDb } from './db.js';

afterAll(async () => {
  await closeTestDb();
});
