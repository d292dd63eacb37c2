"""The console in a real headless Chromium: signing in, and the pages an operator opens."""

from __future__ import annotations

from console_kit import check_accessibility, check_fits_phone, screenshot, sign_in
from playwright.async_api import expect


async def test_a_wrong_password_is_refused_and_the_right_one_signs_in(page):
    await sign_in(page, "not the password")
    await expect(page.get_by_role("alert")).to_have_text("Wrong password.")
    await screenshot(page, "sign-in-refused")
    await sign_in(page)
    await expect(page).to_have_url("/console/lines")
    await expect(page.get_by_role("heading", name="Lines", exact=True)).to_be_visible()


async def test_the_lines_page_lists_the_example_personas(page):
    await sign_in(page)
    lines = page.locator("#lines")
    dental = lines.get_by_role("heading", name="Bright Smile Dental front desk")
    await expect(dental).to_be_visible()
    await expect(lines).to_contain_text("+14155550100")
    await expect(lines).to_contain_text("trattoria-luca")
    await page.get_by_role("button", name="Sign out", exact=True).click()
    await expect(page).to_have_url("/console/login")
    await page.goto("/console/lines")
    await expect(page).to_have_url("/console/login?next=/console/lines")


async def test_sign_out_everywhere_signs_out_the_other_browsers_too(page, browser, console_stack):
    other_context = await browser.new_context(base_url=console_stack.base_url)
    other = await other_context.new_page()
    try:
        await sign_in(page)
        await sign_in(other)
        await expect(other).to_have_url("/console/lines")
        button = page.get_by_role("button", name="Sign out everywhere", exact=True)
        await expect(button).to_be_visible()
        await check_accessibility(page)
        await check_fits_phone(page)
        await button.focus()
        await page.keyboard.press("Enter")  # a real button: the keyboard works it
        await expect(page).to_have_url("/console/login")
        await other.goto("/console/calls")  # the other browser still holds its cookie
        await expect(other).to_have_url("/console/login?next=/console/calls")
        await sign_in(page)  # a new session works at once
        await expect(page).to_have_url("/console/lines")
    finally:
        await other_context.close()
