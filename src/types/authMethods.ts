/** The ways a caller can authenticate (AUTH_METHODS), in the order the server tries them. */
export const AUTH_METHODS = ['api_key', 'password', 'oidc', 'fake'] as const;
export type AuthMethod = (typeof AUTH_METHODS)[number];
