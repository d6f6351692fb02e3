// Type-aware lint: floating promises and non-exhaustive switches are bugs in a server.
import js from '@eslint/js';
import globals from 'globals';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/', 'node_modules/', 'coverage/', '.data/', '.services/'] },
  js.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: {
      globals: { ...globals.node },
      parserOptions: { projectService: { allowDefaultProject: ['eslint.config.js'] }, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-misused-promises': 'error',
      '@typescript-eslint/switch-exhaustiveness-check': 'error',
      '@typescript-eslint/consistent-type-imports': 'error',
      // Fastify plugins and hooks are async by contract, with or without an await inside.
      '@typescript-eslint/require-await': 'off',
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
    },
  },
  {
    // Tenant tables are reached only through withTenant / withSystem (src/db/tenancy.ts), which set
    // the role row-level security checks; a bare db.query would run as the connection's user.
    files: ['src/models/**/*.ts', 'src/routes/**/*.ts', 'src/middleware/**/*.ts', 'src/cli/**/*.ts', 'src/ratelimit/**/*.ts'],
    rules: {
      'no-restricted-syntax': [
        'error',
        {
          selector:
            "CallExpression[callee.property.name=/^(query|transaction|queryInTransaction)$/]:matches([callee.object.name='db'], [callee.object.property.name='db'])",
          message: 'Reach tables through withTenant/queryAsTenant or withSystem/queryAsSystem (src/db/tenancy.ts).',
        },
      ],
    },
  },
  {
    // Tests read JSON bodies (res.json() is `any`) and compare them with asymmetric matchers.
    files: ['test/**/*.ts', 'bench/**/*.ts'],
    rules: {
      '@typescript-eslint/no-unsafe-assignment': 'off',
      '@typescript-eslint/no-unsafe-member-access': 'off',
      '@typescript-eslint/no-unsafe-argument': 'off',
      '@typescript-eslint/no-unsafe-call': 'off',
      '@typescript-eslint/no-non-null-assertion': 'off',
    },
  },
  {
    files: ['eslint.config.js'],
    ...tseslint.configs.disableTypeChecked,
  },
);
